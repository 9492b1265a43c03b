"""The Ray cluster preflight: every node must import the plugin at the driver's version."""

import pytest

from tinylora_verl import __version__
from tinylora_verl.verl import cluster
from tinylora_verl.verl.cluster import NodeReport, find_problems

OK = NodeReport("a" * 40, "10.0.0.1", __version__, None)
MISSING = NodeReport("b" * 40, "10.0.0.2", None, "ModuleNotFoundError: No module named 'tinylora_verl'")
OLD = NodeReport("c" * 40, "10.0.0.3", "0.0.1", None)


@pytest.mark.parametrize("reports, min_nodes, expected", [
    ([OK], 1, []),
    ([OK, OK], 2, []),
    ([OK], 2, ["the cluster has 1 alive node(s); the run asks for trainer.nnodes=2"]),
    ([OK, MISSING], 1, ["node 10.0.0.2 (bbbbbbbbbbbb) cannot import the plugin: ModuleNotFoundError: No module "
                        "named 'tinylora_verl'"]),
    ([OLD], 1, [f"node 10.0.0.3 (cccccccccccc) has tinylora_verl 0.0.1; the driver has {__version__}"]),
])
def test_find_problems(reports, min_nodes, expected):
    assert find_problems(reports, __version__, min_nodes) == expected


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    # address="local": a fresh single-node cluster even when another Ray cluster runs on this machine.
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_check_passes_on_a_node_with_the_plugin(local_ray, capsys):
    reports = cluster.check_cluster(min_nodes=1)
    assert len(reports) == 1 and reports[0].version == __version__ and reports[0].error is None
    assert cluster.main(["check", "--nodes", "1"]) == 0
    assert "preflight ok: 1 node(s)" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, msg", [
    # A node without the plugin, as its worker sees it: the probe ships by value and the import fails there.
    ({"module": "tinylora_verl_absent.register"},
     r"node \S+ \(\w{12}\) cannot import the plugin: ModuleNotFoundError: No module named 'tinylora_verl_absent'"),
    ({"expected_version": "9.9.9"}, rf"has tinylora_verl {__version__}; the driver has 9\.9\.9"),
    ({"min_nodes": 2}, r"the cluster has 1 alive node\(s\); the run asks for trainer\.nnodes=2"),
])
def test_check_fails_loudly(local_ray, kwargs, msg):
    with pytest.raises(SystemExit, match=r"(?s)tinylora_verl preflight failed:.*" + msg + r".*runtime env"):
        cluster.check_cluster(**kwargs)


def test_bad_node_count():
    with pytest.raises(ValueError, match=r"min_nodes=0 must be >= 1"):
        cluster.check_cluster(min_nodes=0)
    with pytest.raises(SystemExit):
        cluster.main(["check", "--nodes", "0"])


def test_probe_runs_where_the_plugin_is_not_installed():
    """Ray pickles the probe by value, so a node without tinylora_verl unpickles and runs it, and reports."""
    import subprocess
    import sys

    cloudpickle = pytest.importorskip("cloudpickle")
    blob = cloudpickle.dumps(cluster._make_probe(cluster.PLUGIN_MODULE))
    code = ("import sys, pickle; sys.modules['tinylora_verl'] = None; "
            "print(pickle.loads(sys.stdin.buffer.read())())")
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().startswith("(None, \"ModuleNotFoundError: No module named 'tinylora_verl")
