//! Where Services and EndpointSlices come from: a folder of manifests or
//! the Kubernetes API. Both hand the same objects to [`crate::model::build`].

pub mod kube;
pub mod manifests;

pub use manifests::Objects;
