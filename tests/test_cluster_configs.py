"""The cluster configurations' privileges (docs/security.md, "Cloud credentials and cluster privileges").

Read from the YAML files only: no cloud, no Kubernetes, no network. The AWS file must not launch
without the user's own security group and instance profiles; on Kubernetes only a head pod that
runs the autoscaler keeps a service-account token, and the Role it gets stays narrow.
"""

from __future__ import annotations

import re
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


# --------------------------------------------------------------------------------------------
# The shipped examples fit each other: every command that runs a shipped space file on a shipped
# cluster passes raytl's own pre-flight check (raytl.cluster.check_fits) on that cluster's nodes.

# vCPUs and GPUs of the instance types the AWS file names (AWS's published specifications)
INSTANCE_SHAPES = {"m6i.2xlarge": {"CPU": 8.0}, "g5.xlarge": {"CPU": 4.0, "GPU": 1.0}}
# docs/cluster.md section 1 runs `cluster/local.sh up 2 1`: a head with no CPUs, 2 nodes x 1 CPU
LOCAL_SH = [{"CPU": 0.0}, {"CPU": 1.0}, {"CPU": 1.0}]
COMMAND = re.compile(r"raytl (?:search|submit)\s+\S*?(search_spaces/[\w.]+\.yaml)((?:.|\\\n)*)")


def aws_nodes() -> list[dict[str, float]]:
    """The nodes up when the AWS cluster starts: the head and each worker type's min_workers."""
    head, types = aws_node_types()
    nodes = [INSTANCE_SHAPES[types[head]["node_config"]["InstanceType"]]]
    for name, node_type in types.items():
        if name != head:
            shape = INSTANCE_SHAPES[node_type["node_config"]["InstanceType"]]
            nodes += [shape] * node_type.get("min_workers", 0)
    return nodes


def pod_shape(group: dict) -> dict[str, float]:
    """What Ray sees of a pod: rayStartParams' num-cpus/num-gpus, else the container's limits."""
    params = group.get("rayStartParams") or {}
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return {
        "CPU": float(params.get("num-cpus", limits["cpu"])),
        "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
    }


def kuberay_nodes(path: Path) -> list[dict[str, float]]:
    """The pods up when the cluster starts: the head and each group's minReplicas."""
    ((_, spec),) = ray_clusters(kuberay_docs(path))
    nodes = [pod_shape(spec["headGroupSpec"])]
    for group in spec["workerGroupSpecs"]:
        nodes += [pod_shape(group)] * group.get("minReplicas", group.get("replicas", 0))
    return nodes


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(space file, --set overrides) of every raytl search/submit command in ``text`` (a
    command continues over lines ending in a backslash, also inside YAML comments)."""
    text = re.sub(r"\\\n\s*#?\s*", " ", text)
    found = []
    for match in COMMAND.finditer(text):
        sets = re.findall(r"--set (\S+)", match.group(2).split("\n")[0])
        kept = [s for s in sets if not s.startswith(("search.storage=", "data.path="))]
        found.append((match.group(1), kept))
    return found


def examples() -> list[tuple[str, str, list[str], list[dict[str, float]]]]:
    """(where, space file, overrides, the nodes it runs on) for every shipped command."""
    found = []
    doc = (REPO / "docs" / "cluster.md").read_text()
    sections = {
        "## 1.": LOCAL_SH,
        "## 3.": aws_nodes(),
        "## 4.": kuberay_nodes(REPO / "cluster" / "kuberay" / "raycluster.yaml"),
    }
    for part in re.split(r"(?m)^(?=## \d\.)", doc):
        nodes = next((n for head, n in sections.items() if part.startswith(head)), None)
        for space, sets in commands(part) if nodes is not None else []:
            found.append((f"docs/cluster.md {part[:5].strip()}", space, sets, nodes))
    for path, nodes in [(AWS, aws_nodes())] + [(p, kuberay_nodes(p)) for p in KUBERAY]:
        for space, sets in commands(path.read_text()):
            found.append((path.name, space, sets, nodes))
    return found


def test_every_shipped_cluster_command_is_found() -> None:
    where = {w for w, *_ in examples()}
    assert where == {
        "docs/cluster.md ## 1.",
        "docs/cluster.md ## 3.",
        "docs/cluster.md ## 4.",
        "aws-gpu.yaml",
        "raycluster.yaml",
        "rayjob.yaml",
    }


@pytest.mark.parametrize(("where", "space", "sets", "nodes"), examples(), ids=lambda v: str(v)[:40])
def test_shipped_space_files_pass_the_preflight_check_on_the_shipped_clusters(
    where: str, space: str, sets: list[str], nodes: list[dict[str, float]]
) -> None:
    from raytl.cluster import check_fits
    from raytl.space_file import load_space

    config = load_space(REPO / space, sets, local_paths=False)
    check_fits(config, nodes)  # raises RaytlError, naming what does not fit
