//! An EndpointSlice as the agent's store keeps it.
//!
//! k8s-openapi's `Endpoint` reserves room for every optional field whether
//! set or not (about 350 bytes with its address, a third of it the object
//! reference the agent never reads); at 10 000 slices of 10 endpoints the
//! store was the largest single part of the agent's memory. The watch
//! deserializes straight into this type, which holds only what the
//! translation reads, and a sync rebuilds k8s-openapi's type for the few
//! Services it translates at a time.

use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer};

/// An EndpointSlice with what the translation reads of it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredSlice {
    /// As the API sent it, less what the source strips.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `IPv4`, `IPv6` or `FQDN` (anything else is reported when translated).
    #[serde(default)]
    address_type: String,
    /// The endpoints, each in a fraction of k8s-openapi's room.
    #[serde(default)]
    endpoints: Option<Vec<StoredEndpoint>>,
    /// The ports, as sent (a few per slice).
    #[serde(default)]
    ports: Option<Vec<EndpointPort>>,
}

/// An endpoint with the fields the translation reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredEndpoint {
    #[serde(default, deserialize_with = "null_as_empty")]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: Option<EndpointConditions>,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    zone: Option<String>,
    /// Rare (topology-aware routing), so boxed.
    #[serde(default)]
    hints: Option<Box<EndpointHints>>,
}

/// A list the API may send as `null`, read as empty.
fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

impl StoredSlice {
    /// k8s-openapi's EndpointSlice with the same content, for the
    /// translation.
    pub fn to_slice(&self) -> EndpointSlice {
        EndpointSlice {
            metadata: self.metadata.clone(),
            address_type: self.address_type.clone(),
            endpoints: self.endpoints.as_ref().map(|all| {
                all.iter()
                    .map(|e| Endpoint {
                        addresses: e.addresses.clone(),
                        conditions: e.conditions.clone(),
                        node_name: e.node_name.clone(),
                        zone: e.zone.clone(),
                        hints: e.hints.as_deref().cloned(),
                        ..Endpoint::default()
                    })
                    .collect()
            }),
            ports: self.ports.clone(),
        }
    }
}

impl k8s_openapi::Resource for StoredSlice {
    const API_VERSION: &'static str = EndpointSlice::API_VERSION;
    const GROUP: &'static str = EndpointSlice::GROUP;
    const KIND: &'static str = EndpointSlice::KIND;
    const VERSION: &'static str = EndpointSlice::VERSION;
    const URL_PATH_SEGMENT: &'static str = EndpointSlice::URL_PATH_SEGMENT;
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for StoredSlice {
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
    fn a_stored_slice_gives_back_what_the_translation_reads() {
        let full: EndpointSlice = serde_json::from_str(SLICE).expect("EndpointSlice");
        let stored: StoredSlice = serde_json::from_str(SLICE).expect("StoredSlice");
        let mut want = full;
        for ep in want.endpoints.iter_mut().flatten() {
            ep.target_ref = None;
        }
        assert_eq!(stored.to_slice(), want);
    }

    #[test]
    fn null_lists_stay_absent() {
        let stored: StoredSlice = serde_json::from_str(
            r#"{"metadata": {"name": "s"}, "addressType": "IPv6", "endpoints": null,
                "ports": null}"#,
        )
        .expect("StoredSlice");
        let slice = stored.to_slice();
        assert!(slice.endpoints.is_none() && slice.ports.is_none());
    }
}
