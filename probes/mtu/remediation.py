"""The CNI settings that fix a node's pod MTU, for the MTU audit's issues and mtu.mismatch.

Pod MTUs come from the CNI: changing a veth by hand lasts until the pod is recreated, so
every MTU fix for pods ends with the CNI's own setting (new pods only).
"""

from __future__ import annotations

CNI_SOURCES = {
    "cilium": "https://docs.cilium.io/en/stable/helm-reference/ (value MTU; "
              "install/kubernetes/cilium/templates/cilium-configmap.yaml writes it as cilium-config key mtu)",
    "calico": "https://docs.tigera.io/calico/latest/networking/configuring/mtu",
    "flannel": "https://github.com/flannel-io/cni-plugin#network-configuration-reference and "
               "https://github.com/flannel-io/flannel/blob/master/Documentation/configuration.md",
}


def cni_remediation(safe_mtu: int, overhead: int | None = None) -> list[str]:
    """The CNI settings that fix the pod MTU at ``safe_mtu`` (new pods only: existing pods keep
    their MTU until they are recreated). Cilium takes the underlying network's MTU and subtracts
    the tunnel overhead itself, so its value is ``safe_mtu + overhead`` when the overhead is known."""
    n = int(safe_mtu)
    base = n + int(overhead) if overhead else n
    return [
        f"helm upgrade cilium cilium/cilium --namespace kube-system --reuse-values --set MTU={base}"
        f"  # Cilium: Helm value MTU (cilium-config key mtu) is the underlying network MTU; Cilium "
        f"subtracts the tunnel overhead itself; restart the cilium DaemonSet, then the pods",
        f"kubectl patch installation.operator.tigera.io default --type merge "
        f"-p '{{\"spec\":{{\"calicoNetwork\":{{\"mtu\":{n}}}}}}}'"
        f"  # Calico (operator install): Installation spec.calicoNetwork.mtu",
        f"kubectl patch configmap/calico-config -n kube-system --type merge "
        f"-p '{{\"data\":{{\"veth_mtu\":\"{n}\"}}}}' && kubectl rollout restart daemonset calico-node -n kube-system"
        f"  # Calico (manifest install): ConfigMap calico-config key veth_mtu",
        f"kubectl -n kube-flannel edit configmap kube-flannel-cfg"
        f"  # Flannel: in cni-conf.json set \"delegate\": {{\"mtu\": {n}}} on the flannel plugin "
        f"(namespace kube-system on older installs); flanneld derives its own MTU from the "
        f"--iface interface, so fix that interface's MTU or --iface for the tunnel itself",
    ]
