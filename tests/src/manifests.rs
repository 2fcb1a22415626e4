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

/// An EndpointSlice for Service `service` whose port `p` is `port`; its
/// `addressType` is IPv6 when its endpoints' addresses are, else IPv4.
pub fn slice(service: &str, name: &str, port: u16, proto: &str, endpoints: &[Ep<'_>]) -> String {
    let family = if endpoints.iter().any(|e| e.addr.contains(':')) {
        "IPv6"
    } else {
        "IPv4"
    };
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: test\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: {family}\nports:\n  - name: p\n    protocol: {proto}\n    port: {port}\nendpoints:\n"
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

/// Makes a Service from [`service`] dual-stack (`RequireDualStack`,
/// IPv4 first): `vip6` is its IPv6 ClusterIP.
pub fn with_ipv6(service: &str, vip6: &str) -> String {
    let line = service
        .lines()
        .find(|l| l.starts_with("  clusterIP: "))
        .expect("a Service with a clusterIP");
    let vip4 = line.trim_start_matches("  clusterIP: ");
    service.replacen(
        &format!("{line}\n"),
        &format!(
            "{line}\n  clusterIPs: [{vip4}, '{vip6}']\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n"
        ),
        1,
    )
}

/// One dual-stack Service port (ClusterIPs `vips`, IPv4 then IPv6) with a
/// slice of ready endpoints of each family (address, node).
#[expect(
    clippy::too_many_arguments,
    reason = "a scenario's whole Service in one call, as `one_port`"
)]
pub fn dual_stack_port(
    name: &str,
    vips: (&str, &str),
    port: u16,
    target: u16,
    node_port: u16,
    proto: &str,
    v4: &[(&str, &str)],
    v6: &[(&str, &str)],
) -> String {
    let ready = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(a, n)| ((*a).to_owned(), (*n).to_owned()))
            .collect()
    };
    let (v4, v6) = (ready(v4), ready(v6));
    let as_eps = |list: &[(String, String)], family: &str| -> String {
        let eps: Vec<Ep<'_>> = list
            .iter()
            .map(|(a, n)| Ep {
                addr: a,
                node: n,
                ready: true,
                terminating: false,
            })
            .collect();
        let s = slice(
            name,
            &format!("{name}-{}", family.to_lowercase()),
            target,
            proto,
            &eps,
        );
        // An empty slice still says its family.
        s.replace("addressType: IPv4", &format!("addressType: {family}"))
    };
    docs(&[
        with_ipv6(
            &service(name, vips.0, port, target, Some(node_port), proto),
            vips.1,
        ),
        as_eps(&v4, "IPv4"),
        as_eps(&v6, "IPv6"),
    ])
}
