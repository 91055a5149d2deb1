"""The cluster configurations' privileges (docs/security.md, "Cloud credentials and cluster privileges").

Read from the YAML files only: no cloud, no Kubernetes, no network. The AWS file must not launch
without the user's own security group and instance profiles; on Kubernetes only a head pod that
runs the autoscaler keeps a service-account token, and the Role it gets stays narrow.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
AWS = REPO / "cluster" / "aws-gpu.yaml"
KUBERAY = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
PLACEHOLDER = "REPLACE_ME"
# What Ray's autoscaler does with the Kubernetes API: read the cluster's pods, read and patch its
# RayCluster (ray python/ray/autoscaler/_private/kuberay/node_provider.py).
ALLOWED_RULES = {
    ("", "pods"): {"get", "list", "watch"},
    ("ray.io", "rayclusters"): {"get", "patch"},
}


def aws_node_types() -> tuple[str, dict]:
    config = yaml.safe_load(AWS.read_text())
    return config["head_node_type"], config["available_node_types"]


def test_aws_head_type_is_defined() -> None:
    head, types = aws_node_types()
    assert head in types and len(types) >= 2, "expected a head type and at least one worker type"


@pytest.mark.parametrize("node_type", aws_node_types()[1])
def test_aws_instance_profile_is_a_required_placeholder(node_type: str) -> None:
    node_config = aws_node_types()[1][node_type]["node_config"]
    profile = node_config.get("IamInstanceProfile")
    # Absent, the launcher gives the head its ray-autoscaler-v1 role (EC2 and S3 full access).
    assert isinstance(profile, dict), f"{node_type}: IamInstanceProfile missing"
    assert set(profile) <= {"Arn", "Name"} and profile, f"{node_type}: not an EC2 profile spec"
    assert PLACEHOLDER in str(profile.get("Arn", profile.get("Name"))), (
        f"{node_type}: IamInstanceProfile must stay a placeholder the user replaces"
    )


def test_aws_head_and_workers_get_different_profiles() -> None:
    head, types = aws_node_types()
    head_profile = types[head]["node_config"]["IamInstanceProfile"]
    for name, node_type in types.items():
        if name != head:
            assert node_type["node_config"]["IamInstanceProfile"] != head_profile, (
                f"{name} would get the head's launch-and-terminate role"
            )


@pytest.mark.parametrize("node_type", aws_node_types()[1])
def test_aws_security_group_is_still_a_placeholder(node_type: str) -> None:
    groups = aws_node_types()[1][node_type]["node_config"].get("SecurityGroupIds")
    assert groups == [f"sg-{PLACEHOLDER}"], f"{node_type}: SecurityGroupIds placeholder changed"


def kuberay_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def ray_clusters(docs: list[dict]) -> list[tuple[str | None, dict]]:
    """(RayCluster name or None when generated, RayCluster spec) for each cluster in a file."""
    found = []
    for doc in docs:
        if doc["kind"] == "RayCluster":
            found.append((doc["metadata"]["name"], doc["spec"]))
        elif doc["kind"] == "RayJob":
            found.append((None, doc["spec"]["rayClusterSpec"]))
    return found


def by_kind_and_name(docs: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def test_kuberay_files_hold_ray_clusters() -> None:
    assert KUBERAY, "no cluster/kuberay/*.yaml"
    for path in KUBERAY:
        assert ray_clusters(kuberay_docs(path)), f"{path.name}: no RayCluster or RayJob"


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_workers_get_no_token(path: Path) -> None:
    for _, spec in ray_clusters(kuberay_docs(path)):
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            assert pod.get("automountServiceAccountToken") is False, (
                f"{path.name}: worker group {group['groupName']} mounts a token"
            )


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_head_token_only_with_the_autoscaler(path: Path) -> None:
    for _, spec in ray_clusters(kuberay_docs(path)):
        head = spec["headGroupSpec"]["template"]["spec"]
        if spec.get("enableInTreeAutoscaling") is True:
            # The autoscaler sidecar needs it; stated explicitly so that nobody flips it by accident.
            assert head.get("automountServiceAccountToken") is True, path.name
        else:
            assert head.get("automountServiceAccountToken") is False, (
                f"{path.name}: no autoscaler, so the head needs no token"
            )


def check_rules(name: str, rules: list[dict], cluster: str) -> None:
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule.get(field, []), f"Role {name}: '*' in {field}"
        assert not rule.get("nonResourceURLs"), f"Role {name}: nonResourceURLs"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                allowed = ALLOWED_RULES.get((group, resource))
                assert allowed is not None, f"Role {name}: {group or 'core'}/{resource}"
                assert set(rule["verbs"]) <= allowed, f"Role {name}: {resource} {rule['verbs']}"
                if resource == "rayclusters":
                    assert rule.get("resourceNames") == [cluster], (
                        f"Role {name}: rayclusters not limited to {cluster}"
                    )


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_head_account_and_role_are_minimal(path: Path) -> None:
    docs = kuberay_docs(path)
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")], path.name
    accounts = by_kind_and_name(docs, "ServiceAccount")
    roles = by_kind_and_name(docs, "Role")
    bindings = by_kind_and_name(docs, "RoleBinding")
    for cluster, spec in ray_clusters(docs):
        head = spec["headGroupSpec"]["template"]["spec"]
        if head.get("automountServiceAccountToken") is False:
            continue
        account = head.get("serviceAccountName")
        if cluster is None:
            # A RayJob's cluster name is generated, so the operator's per-cluster account and
            # Role apply (docs/security.md); never a shared account chosen here.
            assert account is None, f"{path.name}: RayJob head names a ServiceAccount"
            continue
        assert account in accounts, f"{path.name}: head ServiceAccount {account} not in the file"
        assert accounts[account].get("automountServiceAccountToken") is False, account
        # Named like the cluster, so the operator finds them and creates no wider default.
        assert cluster in roles and cluster in bindings, f"{path.name}: Role/RoleBinding {cluster}"
        binding = bindings[cluster]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": cluster,
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
        check_rules(cluster, roles[cluster]["rules"], cluster)
    for name, role in roles.items():
        check_rules(name, role["rules"], name)
