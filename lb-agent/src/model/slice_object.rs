//! An EndpointSlice as the agent reads it, from either source.
//!
//! k8s-openapi's `Endpoint` reserves room for every optional field whether
//! set or not (about 350 bytes with its address, a third of it the object
//! reference the agent never reads); at 10 000 slices of 10 endpoints the
//! API source's store of them was the largest single part of the agent's
//! memory. Both sources deserialize straight into this type, which holds
//! what the translation reads under the API's field names, so the store
//! keeps it and the translation reads it as it is.

use k8s_openapi::api::discovery::v1::{
    EndpointConditions, EndpointHints, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

/// A `discovery.k8s.io/v1` EndpointSlice, with the fields the translation
/// reads (the required ones required, as the API's schema has them).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceObject {
    /// The object's metadata.
    pub metadata: ObjectMeta,
    /// `IPv4`, `IPv6` or `FQDN` (anything else is reported when translated).
    pub address_type: String,
    /// The endpoints.
    pub endpoints: Option<Vec<SliceEndpoint>>,
    /// The ports every endpoint serves.
    pub ports: Option<Vec<EndpointPort>>,
}

/// One endpoint of a [`SliceObject`].
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    /// Its addresses (the API calls them fungible; the first is used).
    pub addresses: Vec<String>,
    /// Ready, serving, terminating.
    pub conditions: Option<EndpointConditions>,
    /// The node it runs on.
    pub node_name: Option<String>,
    /// The zone it runs in.
    pub zone: Option<String>,
    /// Where the EndpointSlice controller suggests it be used; rare
    /// (topology-aware routing), so boxed.
    pub hints: Option<Box<EndpointHints>>,
}

impl k8s_openapi::Resource for SliceObject {
    const API_VERSION: &'static str = EndpointSlice::API_VERSION;
    const GROUP: &'static str = EndpointSlice::GROUP;
    const KIND: &'static str = EndpointSlice::KIND;
    const VERSION: &'static str = EndpointSlice::VERSION;
    const URL_PATH_SEGMENT: &'static str = EndpointSlice::URL_PATH_SEGMENT;
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for SliceObject {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slice as the API sends it, with every field the translation
    /// reads and some it does not.
    const SLICE: &str = r#"{
      "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
      "metadata": {"name": "web-abc", "namespace": "demo",
                   "labels": {"kubernetes.io/service-name": "web"}},
      "addressType": "IPv4",
      "endpoints": [
        {"addresses": ["10.244.1.10"], "conditions": {"ready": true, "serving": true, "terminating": false},
         "nodeName": "node-a", "zone": "z1", "hints": {"forZones": [{"name": "z1"}]},
         "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "demo"}},
        {"addresses": ["10.244.2.10"], "conditions": {"ready": false}}
      ],
      "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    }"#;

    #[test]
    fn a_slice_object_reads_what_k8s_openapi_reads_of_the_fields_it_has() {
        let full: EndpointSlice = serde_json::from_str(SLICE).expect("EndpointSlice");
        let ours: SliceObject = serde_json::from_str(SLICE).expect("SliceObject");
        assert_eq!(ours.metadata, full.metadata);
        assert_eq!(ours.address_type, full.address_type);
        assert_eq!(ours.ports, full.ports);
        let (ours, full) = (ours.endpoints.expect("ours"), full.endpoints.expect("full"));
        assert_eq!(ours.len(), full.len());
        for (o, f) in ours.iter().zip(&full) {
            assert_eq!(o.addresses, f.addresses);
            assert_eq!(o.conditions, f.conditions);
            assert_eq!(o.node_name, f.node_name);
            assert_eq!(o.zone, f.zone);
            assert_eq!(o.hints.as_deref(), f.hints.as_ref());
        }
    }

    #[test]
    fn null_lists_stay_absent_and_required_fields_are_required() {
        let ours: SliceObject = serde_json::from_str(
            r#"{"metadata": {"name": "s"}, "addressType": "IPv6", "endpoints": null,
                "ports": null}"#,
        )
        .expect("SliceObject");
        assert!(ours.endpoints.is_none() && ours.ports.is_none());
        let e = serde_json::from_str::<SliceObject>(r#"{"metadata": {"name": "s"}}"#)
            .expect_err("no addressType");
        assert!(e.to_string().contains("addressType"), "{e}");
    }
}
