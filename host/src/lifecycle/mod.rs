//! The model's life, in TF Serving's split: a **source** says what the repository holds
//! ([`source`]), a pure **policy** says which of those versions should serve
//! ([`policy`]), a **loader** makes one version ready ([`loader`]), the **registry**
//! holds what serves now and the handles requests take ([`registry`]), and one
//! **manager** ([`manager`]) drives them: every trigger (start-up, the poller, an
//! upload, a delete, a label change, Triton's load and unload) calls its guarded
//! `reconcile(model)`. [`upload`] receives and checks a bundle before the manager
//! installs it.
//!
//! The flow is one way: `api` reads the registry and calls the manager's triggers; the
//! manager reads the source and the policy, drives the loader and changes the registry.
//! This module uses `routing` (an endpoint's router is loaded here) but `routing` never
//! reaches back: variants are resolved through the registry by `api`.

pub mod loader;
pub mod manager;
pub mod objects;
pub mod policy;
pub mod registry;
pub mod source;
pub mod upload;

pub use loader::{
    in_background, serve_as, BudgetExceeded, DeviceBudget, Load, LoadError, Loader, Reservation,
    WarmupHook,
};
pub use manager::{LoadReport, Manager};
pub use policy::{Policies, VersionPolicy};
pub use registry::{
    EndpointVersion, ModelVersion, Registry, ResolveError, Servable, State, VersionStatus,
};
pub use upload::{Stored, UploadError, Uploads};
