//! What the gRPC service tells about models: metadata, Triton's model configuration
//! (derived from the manifest) and statistics (from the server's own counters).

use super::pb;
use crate::api::{ApiError, AppState};
use crate::lifecycle::{ModelVersion, Servable};
use crate::tensor::DType;
use std::sync::Arc;

/// `ModelMetadata`: the same content as `GET /v2/models/{model}`.
pub fn metadata(s: &ModelVersion, versions: Vec<String>) -> pb::ModelMetadataResponse {
    use pb::model_metadata_response::TensorMetadata;
    let spec = s.model_spec();
    let list = |l: &[crate::bundle::TensorSpec]| -> Vec<TensorMetadata> {
        l.iter()
            .map(|t| TensorMetadata {
                name: t.name.clone(),
                datatype: t.dtype.v2_name().to_string(),
                shape: t.shape.clone(),
            })
            .collect()
    };
    pb::ModelMetadataResponse {
        name: s.name().to_string(),
        versions,
        platform: crate::api::model_platform(spec).to_string(),
        inputs: list(&spec.inputs),
        outputs: list(&spec.outputs),
    }
}

fn data_type(d: DType) -> pb::DataType {
    use pb::DataType as T;
    match d {
        DType::Bool => T::TypeBool,
        DType::Uint8 => T::TypeUint8,
        DType::Int8 => T::TypeInt8,
        DType::Int16 => T::TypeInt16,
        DType::Int32 => T::TypeInt32,
        DType::Int64 => T::TypeInt64,
        DType::Fp16 => T::TypeFp16,
        DType::Bf16 => T::TypeBf16,
        DType::Fp32 => T::TypeFp32,
        DType::Fp64 => T::TypeFp64,
    }
}

/// `ModelConfig`: Triton's configuration of a version, derived from its manifest. With
/// `[batching]` the model batches: `max_batch_size` is the batcher's and the dims leave
/// out the batch dimension (Triton's rule); without it, `max_batch_size` is 0 and the dims
/// are the manifest's shapes whole. A handler plugin's model takes one BYTES input.
pub fn config(s: &ModelVersion) -> pb::ModelConfig {
    let spec = s.model_spec();
    let manifest = &s.bundle.manifest;
    let batching = manifest.batching.as_ref();
    let dims = |shape: &[i64]| -> Vec<i64> {
        match batching {
            Some(_) => shape.iter().skip(1).copied().collect(),
            None => shape.to_vec(),
        }
    };
    let mut parameters = std::collections::HashMap::new();
    if let Some(h) = &manifest.handler {
        parameters.insert(
            "nnserve_handler_plugin".to_string(),
            pb::ModelParameter {
                string_value: h.path.clone(),
            },
        );
    }
    let gpu = s.runner().device().starts_with("cuda");
    pb::ModelConfig {
        name: s.name().to_string(),
        platform: crate::api::model_platform(spec).to_string(),
        backend: match spec.backend {
            crate::bundle::BackendKind::Torchscript => "pytorch".into(),
            crate::bundle::BackendKind::Tensorflow => "tensorflow".into(),
            crate::bundle::BackendKind::None => "nnserve_plugin".into(),
        },
        max_batch_size: batching.map_or(0, |b| b.max_batch_size.min(i32::MAX as u32) as i32),
        input: spec
            .inputs
            .iter()
            .map(|t| pb::ModelInput {
                name: t.name.clone(),
                data_type: data_type(t.dtype) as i32,
                dims: dims(&t.shape),
            })
            .collect(),
        output: spec
            .outputs
            .iter()
            .map(|t| pb::ModelOutput {
                name: t.name.clone(),
                data_type: data_type(t.dtype) as i32,
                dims: dims(&t.shape),
            })
            .collect(),
        instance_group: vec![pb::ModelInstanceGroup {
            name: format!("{}_0", s.name()),
            count: 1,
            gpus: Vec::new(),
            kind: if gpu {
                pb::model_instance_group::Kind::Gpu as i32
            } else {
                pb::model_instance_group::Kind::Cpu as i32
            },
        }],
        default_model_filename: spec.path.clone(),
        scheduling_choice: batching.map(|b| {
            pb::model_config::SchedulingChoice::DynamicBatching(pb::ModelDynamicBatching {
                preferred_batch_size: b
                    .allowed_batch_sizes
                    .iter()
                    .map(|&n| n.min(i32::MAX as u32) as i32)
                    .collect(),
                max_queue_delay_microseconds: b.batch_timeout_micros,
            })
        }),
        parameters,
        version_policy: None,
    }
}

/// `ModelStatistics` of one version, from its own counters: `success` and `fail` are the
/// requests that reached it (with their whole time), `queue` the waits for a forward and
/// `compute_infer` the forwards (one per batch), as in `/metrics`.
fn statistics(s: &ModelVersion) -> pb::ModelStatistics {
    use std::sync::atomic::Ordering::Relaxed;
    let m = s.runner().metrics();
    let c = &m.counts;
    let duration = |(count, ns): (u64, u64)| Some(pb::StatisticDuration { count, ns });
    let ok = c.ok.load(Relaxed);
    let (forwards, forward_ns) = (c.forwards.load(Relaxed), c.forwards_ns.load(Relaxed));
    pb::ModelStatistics {
        name: s.name().to_string(),
        version: s.version().to_string(),
        last_inference: c.last_ms.load(Relaxed),
        // Rows through the model when it batches; else one per request.
        inference_count: s.runner().batch_stats().map_or(ok, |b| b.rows),
        execution_count: forwards,
        inference_stats: Some(pb::InferStatistics {
            success: duration((ok, c.ok_ns.load(Relaxed))),
            fail: duration((c.failed.load(Relaxed), c.failed_ns.load(Relaxed))),
            queue: duration((c.queued.load(Relaxed), c.queued_ns.load(Relaxed))),
            compute_input: duration((0, 0)),
            compute_infer: duration((forwards, forward_ns)),
            compute_output: duration((0, 0)),
            cache_hit: duration((0, 0)),
            cache_miss: duration((0, 0)),
        }),
        batch_stats: Vec::new(),
    }
}

/// Statistics of every available version of `name` (every model when empty), or of one
/// version.
pub fn all_statistics(
    state: &AppState,
    name: &str,
    version: Option<u64>,
) -> Result<pb::ModelStatisticsResponse, ApiError> {
    let names: Vec<String> = if name.is_empty() {
        state.registry.model_names()
    } else {
        vec![crate::api::model_name(name)?.to_string()]
    };
    let mut model_stats = Vec::new();
    for n in names {
        let versions = match version {
            Some(v) => vec![v],
            None => state.registry.available_versions(&n),
        };
        if versions.is_empty() && !name.is_empty() {
            // Not loaded, or not a model: the same error as an inference would get.
            state.registry.resolve(&n, None)?;
        }
        for v in versions {
            match state.registry.resolve(&n, Some(v)) {
                Ok(Servable::Model(m)) => model_stats.push(statistics(&m)),
                Ok(Servable::Endpoint(_)) => {}
                Err(e) if name.is_empty() => tracing::debug!("statistics: {e}"),
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(pb::ModelStatisticsResponse { model_stats })
}

/// The model version a metadata or config call means (an endpoint's default variant's).
pub fn target(state: &AppState, name: &str, version: &str) -> Result<Arc<ModelVersion>, ApiError> {
    let name = crate::api::model_name(name)?;
    let version = super::version_of(version)?;
    crate::api::resolve_model(state, name, version, None)
}
