//! Small generators of Service and EndpointSlice YAML for scenarios.

use std::fmt::Write as _;

/// One endpoint of a slice: address, node name, ready.
pub struct Ep<'a> {
    /// Pod address.
    pub addr: &'a str,
    /// The node it runs on (`node-a`, `node-b`).
    pub node: &'a str,
    /// `conditions.ready`.
    pub ready: bool,
    /// Terminating but still serving (then `ready` is ignored: false).
    pub terminating: bool,
}

/// Ready endpoints at `addrs`, all on node `node`.
pub fn ready_on<'a>(node: &'a str, addrs: &'a [String]) -> Vec<Ep<'a>> {
    addrs
        .iter()
        .map(|a| Ep {
            addr: a,
            node,
            ready: true,
            terminating: false,
        })
        .collect()
}

/// A Service with one port: ClusterIP `cluster_ip:port`, target port
/// `target`, optional NodePort, protocol `TCP` or `UDP`.
pub fn service(
    name: &str,
    cluster_ip: &str,
    port: u16,
    target: u16,
    node_port: Option<u16>,
    proto: &str,
) -> String {
    let kind = if node_port.is_some() {
        "NodePort"
    } else {
        "ClusterIP"
    };
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: test\nspec:\n  type: {kind}\n  clusterIP: {cluster_ip}\n  ports:\n    - name: p\n      protocol: {proto}\n      port: {port}\n      targetPort: {target}\n"
    );
    if let Some(np) = node_port {
        let _ = writeln!(s, "      nodePort: {np}");
    }
    s
}

/// Adds `sessionAffinity: ClientIP` with `timeout` seconds to a Service.
pub fn with_affinity(service: &str, timeout: u32) -> String {
    format!("{service}  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout}}}}}\n")
}

/// Sets `externalTrafficPolicy` and `internalTrafficPolicy` to `Local`
/// where asked.
pub fn with_local_policies(service: &str, external: bool, internal: bool) -> String {
    let mut s = service.to_string();
    if external {
        s.push_str("  externalTrafficPolicy: Local\n");
    }
    if internal {
        s.push_str("  internalTrafficPolicy: Local\n");
    }
    s
}

/// Makes a Service a LoadBalancer with ingress IP `ip`, guarded by
/// `ranges` (none: open).
pub fn with_load_balancer(service: &str, ip: &str, ranges: &[&str]) -> String {
    let mut s = service
        .replace("  type: ClusterIP\n", "  type: LoadBalancer\n")
        .replace("  type: NodePort\n", "  type: LoadBalancer\n");
    if !ranges.is_empty() {
        s.push_str(&format!(
            "  loadBalancerSourceRanges: [{}]\n",
            ranges.join(", ")
        ));
    }
    s.push_str(&format!(
        "status:\n  loadBalancer:\n    ingress: [{{ip: {ip}}}]\n"
    ));
    s
}

/// Adds `externalIPs` to a Service.
pub fn with_external_ips(service: &str, ips: &[&str]) -> String {
    format!("{service}  externalIPs: [{}]\n", ips.join(", "))
}

/// An EndpointSlice for Service `service` whose port `p` is `port`.
pub fn slice(service: &str, name: &str, port: u16, proto: &str, endpoints: &[Ep<'_>]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: test\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n  - name: p\n    protocol: {proto}\n    port: {port}\nendpoints:\n"
    );
    for e in endpoints {
        let conditions = if e.terminating {
            "{ready: false, serving: true, terminating: true}".to_string()
        } else {
            format!("{{ready: {}}}", e.ready)
        };
        let _ = write!(
            s,
            "  - addresses: [{}]\n    nodeName: {}\n    conditions: {conditions}\n",
            e.addr, e.node
        );
    }
    if endpoints.is_empty() {
        s.push_str("  []\n");
        s = s.replace("endpoints:\n  []\n", "endpoints: []\n");
    }
    s
}

/// A Node named `name` whose InternalIP is `addr`.
pub fn node(name: &str, addr: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nstatus:\n  addresses:\n    - {{type: InternalIP, address: {addr}}}\n    - {{type: Hostname, address: {name}}}\n"
    )
}

/// Joins documents into one multi-document YAML file.
pub fn docs(parts: &[String]) -> String {
    parts.join("---\n")
}

/// One Service port with one slice of ready endpoints (address, node).
pub fn one_port(
    name: &str,
    vip: &str,
    port: u16,
    target: u16,
    node_port: u16,
    proto: &str,
    endpoints: &[(&str, &str)],
) -> String {
    let eps: Vec<Ep<'_>> = endpoints
        .iter()
        .map(|(a, n)| Ep {
            addr: a,
            node: n,
            ready: true,
            terminating: false,
        })
        .collect();
    docs(&[
        service(name, vip, port, target, Some(node_port), proto),
        slice(name, &format!("{name}-1"), target, proto, &eps),
    ])
}
