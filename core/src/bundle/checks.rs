//! The rules a parsed manifest must follow ([`Manifest::check`]): names and versions,
//! a model or an endpoint but not both, tensor signatures, batching parameters (and what
//! one batch may weigh), plugin limits, variants, and paths that stay inside the bundle.
//! Every reason is reported, not only the first.
//!
//! Nothing here touches the file system: files are `Bundle::open`'s (with `paths`).

use super::manifest::{BackendKind, DeviceSpec, Manifest, PluginSpec, MAX_BATCH_INPUT_BYTES};
use super::paths::relative_path;

/// More models than a handler could sensibly chain; a bound on what a manifest may list.
const MAX_DEPENDENCIES: usize = 32;

impl Manifest {
    /// Checks that do not touch the file system. Returns every reason found.
    pub fn check(&self) -> Vec<String> {
        let mut r = Vec::new();
        if let Err(e) = crate::names::check_name("bundle.name", &self.bundle.name) {
            r.push(e);
        }
        if let Err(e) = crate::names::check_version(self.bundle.version) {
            r.push(format!("bundle.version: {e}"));
        }
        if self.endpoint.is_some() || self.router.is_some() || !self.variants.is_empty() {
            self.check_endpoint(&mut r);
        } else if self.model.is_none() && self.handler.is_none() {
            r.push(
                "a [model] section, a [handler] (a model-less plugin bundle), or both are required \
                 (or, for an endpoint bundle, [endpoint], [[variants]] and [router])"
                    .to_string(),
            );
        } else if self.model.is_none() && self.batching.is_some() {
            r.push("[batching] batches a model's forwards; this bundle has no [model]".to_string());
        }
        match &self.model {
            None => {}
            Some(m) => {
                if let Err(e) = DeviceSpec::parse(&m.device) {
                    r.push(format!("model.device: {e}"));
                }
                if m.backend == BackendKind::Tensorflow && !cfg!(feature = "tensorflow") {
                    r.push(
                        "model.backend \"tensorflow\": this nnserve was built without the tensorflow feature; \
                         build it with `cargo build --release --features tensorflow` (make setup does)"
                            .to_string(),
                    );
                }
                if m.path.is_empty() {
                    r.push("model.path is required (the model file in the bundle)".to_string());
                }
                if m.backend != BackendKind::Tensorflow
                    && (m.tags.is_some() || m.signature.is_some())
                {
                    r.push(
                        "model.tags and model.signature belong to a tensorflow model".to_string(),
                    );
                }
                for (kind, list) in [("inputs", &m.inputs), ("outputs", &m.outputs)] {
                    let mut seen = std::collections::HashSet::new();
                    for t in list.iter() {
                        if t.name.is_empty() {
                            r.push(format!("model.{kind}: a tensor name is empty"));
                        }
                        if !seen.insert(&t.name) {
                            r.push(format!("model.{kind}: the name '{}' appears twice", t.name));
                        }
                        if t.shape.iter().any(|&d| d < -1 || d == 0) {
                            r.push(format!(
                                "model.{kind} '{}': shape {:?} may hold only positive sizes and -1",
                                t.name, t.shape
                            ));
                        }
                    }
                }
                if m.inputs.is_empty()
                    && self.handler.is_none()
                    && m.backend != BackendKind::Tensorflow
                {
                    r.push(
                        "model.inputs is empty: the tensor APIs need the model's inputs (name, dtype, shape)"
                            .to_string(),
                    );
                }
            }
        }
        if let Some(b) = &self.batching {
            if b.max_batch_size == 0 {
                r.push("batching.max_batch_size must be at least 1".to_string());
            }
            if let Some(&last) = b.allowed_batch_sizes.last() {
                if !b.allowed_batch_sizes.windows(2).all(|w| w[0] < w[1]) {
                    r.push("batching.allowed_batch_sizes must be increasing".to_string());
                }
                if last != b.max_batch_size {
                    r.push(format!(
                        "batching.allowed_batch_sizes must end with max_batch_size ({}), as in TF Serving",
                        b.max_batch_size
                    ));
                }
            }
            if b.num_batch_threads == Some(0) {
                r.push("batching.num_batch_threads must be at least 1".to_string());
            }
            if let Some(m) = &self.model {
                for t in m.inputs.iter().filter(|t| t.shape.first() != Some(&-1)) {
                    r.push(format!(
                        "batching needs a batch dimension: input '{}' has shape {:?}, whose first size must be -1",
                        t.name, t.shape
                    ));
                }
                // A SavedModel's inputs come from its signature: not checked here.
                if !m.inputs.is_empty() {
                    for name in b.pad_values.keys() {
                        if !m.inputs.iter().any(|t| &t.name == name) {
                            r.push(format!(
                                "batching.pad_values names {}, which is not an input of [model] (inputs: {})",
                                crate::names::shown(name),
                                m.inputs.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ")
                            ));
                        }
                    }
                }
            }
            if !b.pad_values.is_empty() && !b.pad_variable_length_inputs {
                r.push("batching.pad_values is set but pad_variable_length_inputs is not: set pad_variable_length_inputs = true to batch inputs of different lengths".to_string());
            }
            if b.pad_values.values().any(|v| !v.is_finite()) {
                r.push("batching.pad_values must be finite numbers".to_string());
            }
        }
        // The largest batch the server builds (and warms up with, on zeros) must fit in
        // memory: a declared shape of [-1, 4e12] or a max_batch_size of 1e8 would
        // otherwise take the process down at load.
        if let Some(m) = &self.model {
            let rows = self
                .batching
                .as_ref()
                .map_or(1, |b| b.max_batch_size.max(1)) as i64;
            for t in &m.inputs {
                let mut shape: Vec<i64> = t.shape.iter().map(|&d| d.max(1)).collect();
                if let Some(first) = shape.first_mut() {
                    *first = if t.shape[0] == -1 { rows } else { *first };
                }
                let bytes = crate::tensor::checked_bytes(&shape, t.dtype);
                if bytes.is_none_or(|b| b > MAX_BATCH_INPUT_BYTES) {
                    r.push(format!(
                        "model.inputs '{}': a batch of shape {shape:?} (max_batch_size rows, -1 taken as 1) is over the {} MiB a batch input may take; check the declared shape and max_batch_size",
                        t.name,
                        MAX_BATCH_INPUT_BYTES >> 20
                    ));
                }
            }
        }
        if let Some(h) = &self.handler {
            if h.limits.memory_mib == 0 || h.limits.cpu_ms == 0 {
                r.push("handler.limits: memory_mib and cpu_ms must be positive".to_string());
            }
            self.check_dependencies(h, &mut r);
        }
        if self.router.as_ref().is_some_and(|p| p.init) {
            r.push("router.init: router instances are reused between calls already; init belongs to a [handler]".to_string());
        }
        if self
            .router
            .as_ref()
            .is_some_and(|p| !p.dependencies.is_empty())
        {
            r.push("router.dependencies: a router picks among its [[variants]] and loads no model; declare dependencies in a model bundle's [handler]".to_string());
        }
        for (what, p) in self.paths() {
            if let Err(e) = relative_path(p) {
                r.push(format!("{what} `{p}`: {e}"));
            }
        }
        r
    }

    fn check_dependencies(&self, h: &PluginSpec, r: &mut Vec<String>) {
        if h.dependencies.len() > MAX_DEPENDENCIES {
            r.push(format!(
                "handler.dependencies: {} entries, at most {MAX_DEPENDENCIES} are allowed",
                h.dependencies.len()
            ));
            return;
        }
        let mut seen = std::collections::BTreeSet::new();
        for text in &h.dependencies {
            match super::manifest::Dependency::parse(text) {
                Err(e) => r.push(format!(
                    "handler.dependencies {}: {e} (write NAME, NAME@VERSION or NAME@LABEL)",
                    crate::names::shown(text)
                )),
                Ok(d) if d.model == self.bundle.name => r.push(format!(
                    "handler.dependencies: {} is this bundle's own model, which the plugin loads as \"default\" or by its name already",
                    d.model
                )),
                Ok(d) if d.model == "default" => r.push(
                    "handler.dependencies: \"default\" names the bundle's own model; a dependency must be another model".to_string(),
                ),
                Ok(d) if !seen.insert(d.model.clone()) => r.push(format!(
                    "handler.dependencies: {} is declared twice (a plugin loads a dependency by its model name, so one pin per model)",
                    d.model
                )),
                Ok(_) => {}
            }
        }
    }

    /// The plugin sections with their world: `("handler", ..)` and `("router", ..)`.
    pub fn plugins(&self) -> Vec<(&'static str, &PluginSpec)> {
        let mut v = Vec::new();
        if let Some(h) = &self.handler {
            v.push(("handler", h));
        }
        if let Some(r) = &self.router {
            v.push(("router", r));
        }
        v
    }

    /// Is this an endpoint bundle (variants behind a router)?
    pub fn is_endpoint(&self) -> bool {
        self.endpoint.is_some()
    }

    fn check_endpoint(&self, r: &mut Vec<String>) {
        let Some(e) = &self.endpoint else {
            r.push("[[variants]] and [router] belong to an endpoint bundle, which needs an [endpoint] section".to_string());
            return;
        };
        for (what, present) in [
            ("[model]", self.model.is_some()),
            ("[batching]", self.batching.is_some()),
            ("[handler]", self.handler.is_some()),
        ] {
            if present {
                r.push(format!(
                    "an endpoint bundle has no {what}: it routes to model bundles named in [[variants]]"
                ));
            }
        }
        if self.router.is_none() {
            r.push(
                "an endpoint bundle needs a [router] section (path to the router plugin)"
                    .to_string(),
            );
        }
        if self.variants.is_empty() {
            r.push("an endpoint bundle needs at least one [[variants]] entry".to_string());
        }
        let mut names = std::collections::HashSet::new();
        for v in &self.variants {
            let name = v.name();
            if let Err(e) = crate::names::check_name("variants: model", &v.model) {
                r.push(e);
            }
            if v.model == self.bundle.name {
                r.push(format!(
                    "variants: the endpoint '{}' cannot route to itself",
                    v.model
                ));
            }
            if let Err(e) = crate::names::check_name("variants: name", name) {
                r.push(e);
            }
            if !names.insert(name) {
                r.push(format!(
                    "variants: the name '{name}' appears twice; give variants of one model a `name` each"
                ));
            }
            if v.version.is_some() && v.label.is_some() {
                r.push(format!(
                    "variants '{name}': give a version or a label, not both"
                ));
            }
            if let Some(Err(e)) = v.version.map(crate::names::check_version) {
                r.push(format!("variants '{name}': {e}"));
            }
        }
        if let Some(d) = &e.default_variant {
            if !self.variants.iter().any(|v| v.name() == d) {
                r.push(format!(
                    "endpoint.default_variant '{d}' is not the name of a variant ({})",
                    self.variants
                        .iter()
                        .map(|v| v.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        if let Some(h) = &e.routing_key_header {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                r.push(format!(
                    "endpoint.routing_key_header {h:?} is not a header name"
                ));
            }
        }
        if e.stats_window_ms == 0 {
            r.push("endpoint.stats_window_ms must be positive".to_string());
        }
        if let Some(rt) = &self.router {
            if rt.limits.memory_mib == 0 || rt.limits.cpu_ms == 0 {
                r.push("router.limits: memory_mib and cpu_ms must be positive".to_string());
            }
        }
    }

    /// Every path the manifest names, with its field (`model.path`, ...).
    pub fn paths(&self) -> Vec<(&'static str, &str)> {
        let mut v = Vec::new();
        if let Some(rt) = &self.router {
            v.push(("router.path", rt.path.as_str()));
        }
        if let Some(m) = &self.model {
            v.push(("model.path", m.path.as_str()));
        }
        if let Some(h) = &self.handler {
            v.push(("handler.path", h.path.as_str()));
        }
        v
    }
}
