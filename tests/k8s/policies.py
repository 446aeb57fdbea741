"""TEST INFRASTRUCTURE: what the manifests' NetworkPolicies allow, evaluated as the API defines
it (networking.k8s.io/v1), for tests/test_k8s.py (offline) and tests/k8s/test_pods.py (against
the ports and connections of the running pods). Only what the manifests use: pod and namespace
selectors with matchLabels, ports by number or by the container's port name, TCP."""


def matches(selector, labels):
    """A label selector: empty selects everything; matchExpressions are not used here."""
    assert set(selector) <= {"matchLabels"}, selector
    return selector.get("matchLabels", {}).items() <= labels.items()


def port_matches(rule_ports, container, port):
    if not rule_ports:  # a rule without ports allows every port
        return True
    names = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    for rule_port in rule_ports:
        assert rule_port.get("protocol", "TCP") in ("TCP", "UDP"), rule_port
        if rule_port.get("protocol", "TCP") == "TCP" and names.get(rule_port["port"], rule_port["port"]) == port:
            return True
    return False


def selecting(policies, labels, kind):
    return [p for p in policies if kind in p["spec"].get("policyTypes", ["Ingress"]) and matches(p["spec"]["podSelector"], labels)]


def peer_matches(peers, labels, same_namespace=True):
    """A rule's from/to list against a pod with these labels, of this namespace or of another
    one whose labels no rule names (no list: every peer)."""
    if not peers:
        return True
    for peer in peers:
        if "ipBlock" in peer:
            continue  # addresses outside the cluster: never a pod here
        if "namespaceSelector" in peer:
            if peer["namespaceSelector"].get("matchLabels"):
                continue  # a namespace by name (kube-system's DNS): not one of these pods
        elif not same_namespace:
            continue  # a podSelector alone selects pods of the policy's own namespace
        if matches(peer.get("podSelector", {}), labels):
            return True
    return False


def covering_policies(policies, labels, container, port):
    """Names of the policies with an ingress rule that opens `port` of a pod with these labels."""
    return sorted({p["metadata"]["name"] for p in selecting(policies, labels, "Ingress")
                   for rule in p["spec"].get("ingress", []) if port_matches(rule.get("ports"), container, port)})


def connection_allowed(policies, source, target, target_container, port, source_in_namespace=True):
    """Whether pod `source` may open a TCP connection to `port` of pod `target`: egress of the
    source and ingress of the target must both allow it (or select neither pod). A source in
    another namespace is not subject to these policies' egress rules."""
    ingress = selecting(policies, target.labels, "Ingress")
    egress = selecting(policies, source.labels, "Egress") if source_in_namespace else []
    allowed_in = not ingress or any(peer_matches(rule.get("from"), source.labels, source_in_namespace) and
                                    port_matches(rule.get("ports"), target_container, port)
                                    for p in ingress for rule in p["spec"].get("ingress", []))
    allowed_out = not egress or any(peer_matches(rule.get("to"), target.labels) and
                                    port_matches(rule.get("ports"), target_container, port)
                                    for p in egress for rule in p["spec"].get("egress", []))
    return allowed_in and allowed_out


def listening_ports(proc_net_tcp):
    """The TCP ports in state LISTEN (0A) in /proc/net/tcp and tcp6 text."""
    ports = set()
    for line in proc_net_tcp.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A":
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
