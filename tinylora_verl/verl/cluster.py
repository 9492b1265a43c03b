"""Preflight for a Ray cluster: is the plugin importable, at this version, on every node?

    python -m tinylora_verl.verl.cluster check [--nodes N] [--address auto]

verl imports ``model.external_lib`` (``tinylora_verl.verl.register``) in each worker, so a node without the
plugin fails, but only after the driver has loaded data, placed workers and started vLLM, and with a bare
``ModuleNotFoundError`` in one worker's log. This check runs first in ``recipes/ray_submit.sh``'s job: one
zero-CPU task pinned to each alive node imports the plugin there (inside the job's runtime env, exactly as the
workers will) and the job stops with one message naming every node that lacks it or has another version.

The probe is a closure, so Ray ships it by value: a node without ``tinylora_verl`` can still run it and report.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

PLUGIN_MODULE = "tinylora_verl.verl.register"


@dataclass(frozen=True)
class NodeReport:
    """What one node's probe found."""

    node_id: str
    address: str
    version: Optional[str]
    error: Optional[str]


def _make_probe(module: str):
    def probe() -> tuple[Optional[str], Optional[str]]:
        import importlib

        try:
            importlib.import_module(module)
            top = importlib.import_module(module.split(".")[0])
            return getattr(top, "__version__", "unknown"), None
        except BaseException as e:  # noqa: BLE001 - the report must carry whatever the import raised
            return None, f"{type(e).__name__}: {e}"

    return probe


def probe_nodes(module: str = PLUGIN_MODULE, timeout: float = 300.0) -> list[NodeReport]:
    """Import ``module`` on every alive node of the connected Ray cluster (one pinned zero-CPU task each)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    task = ray.remote(num_cpus=0)(_make_probe(module))
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in nodes]
    results = ray.get(refs, timeout=timeout)
    return [NodeReport(n["NodeID"], n.get("NodeManagerAddress", "?"), version, error)
            for n, (version, error) in zip(nodes, results)]


def find_problems(reports: Sequence[NodeReport], expected_version: str, min_nodes: int = 1) -> list[str]:
    """One line per problem: too few nodes, a node that cannot import the plugin, a node at another version."""
    problems = []
    if len(reports) < min_nodes:
        problems.append(f"the cluster has {len(reports)} alive node(s); the run asks for trainer.nnodes={min_nodes}")
    for r in reports:
        where = f"node {r.address} ({r.node_id[:12]})"
        if r.error is not None:
            problems.append(f"{where} cannot import the plugin: {r.error}")
        elif r.version != expected_version:
            problems.append(f"{where} has tinylora_verl {r.version}; the driver has {expected_version}")
    return problems


def check_cluster(min_nodes: int = 1, address: str = "auto", module: str = PLUGIN_MODULE,
                  expected_version: Optional[str] = None) -> list[NodeReport]:
    """Connect (unless connected), probe every node, raise ``SystemExit`` listing every problem found."""
    import importlib.metadata

    import ray

    if min_nodes < 1:
        raise ValueError(f"min_nodes={min_nodes} must be >= 1")
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    reports = probe_nodes(module)
    # The installed distribution's version: the package's __version__, which tests/test_docker.py pins to it.
    problems = find_problems(reports, expected_version or importlib.metadata.version("tinylora-verl"), min_nodes)
    if problems:
        raise SystemExit(
            "tinylora_verl preflight failed:\n  - " + "\n  - ".join(problems) + "\nInstall the plugin on every "
            "node (bake it into the image, see docker/) or give the job a runtime env that pip-installs it "
            "(recipes/runtime_env.yaml); py_modules/working_dir are not enough, verl finds plugins by entry point.")
    return reports


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tinylora_verl.verl.cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    chk = sub.add_parser("check", help="Probe every node of the Ray cluster for the plugin.")
    chk.add_argument("--nodes", type=int, default=1, help="Alive nodes the run needs (trainer.nnodes).")
    chk.add_argument("--address", default="auto", help="Ray address (inside a Ray job: auto).")
    args = p.parse_args(argv)
    if args.nodes < 1:
        p.error(f"--nodes must be >= 1, got {args.nodes}")
    reports = check_cluster(args.nodes, args.address)
    for r in reports:
        print(f"[tinylora_verl] node {r.address} ({r.node_id[:12]}): tinylora_verl {r.version}", flush=True)
    print(f"[tinylora_verl] preflight ok: {len(reports)} node(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
