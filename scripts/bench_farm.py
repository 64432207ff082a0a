#!/usr/bin/env python3
"""Inference farm benchmark: studies per hour through the whole node with one and with two Triton servers, and the
latency of ``backend = "triton"`` against ``"local"`` for one model on a real CT.

Method
------
* Servers: NVIDIA's tritonserver (nvidia-pytriton, ``.venv-triton``) on loopback with mutual TLS, serving the
  repository ``python -m gateway triton-repo --kind cpu`` writes (one CPU instance each).
* Throughput: every server's model takes a fixed service time on top of the model itself (``--service-seconds``,
  the ``slow:remote_infer`` failpoint: a sleep, as a GPU busy with another study would be), so that the two cores
  here measure the node's orchestration, not the CPU. A node (``python -m gateway serve``, ``[pipeline] workers``
  = 4, the folder destination) gets ``--studies`` CT phantoms of 30 slices (160 x 160) sent one after the other by
  dcmtk ``storescu``; the figure is the steady rate at which RT Structure Sets come out: (studies - 1) / (last
  written - first written), per hour (the first study's way through the pipeline is latency, not throughput).
  Ideal: one study per service time per server.
* Latency: the same process runs the model in place (``Predictor``) and through one server (``RemotePredictor``:
  the volume over gRPC with TLS, the whole prediction on the server, the masks back), alternately, ``--runs``
  times each, medians compared: on the couch phantom of 512 x 512 x ``--slices`` (100: the issue's size) and on
  the pyradiomics chest CT ``lung2`` (512 x 512 x 61, the largest real CT here). The
  difference is the farm's cost per series: the volume and the masks on the wire (TLS, protobuf, Triton's
  copies into the Python backend), their encoding and decoding.

Targets (issue 21): two servers >= 1.8x the studies per hour of one; overhead <= 10 %. Printed, never asserted;
the last line is the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from gateway.config import parse_config  # noqa: E402
from gateway.inference.farm import TritonFarm  # noqa: E402
from gateway.inference.packages import load_model  # noqa: E402
from gateway.inference.predictor import Predictor  # noqa: E402
from gateway.inference.remote import RemotePredictor  # noqa: E402
from gateway.inference.volume import Volume, volume_from_datasets  # noqa: E402
from tests.conftest import dcmtk_env, require_tool, start_node, write_config  # noqa: E402
from tests.pki import PKI, make_pki  # noqa: E402
from tests.realct import real_chest_ct  # noqa: E402
from tests.synthetic import couch_phantom, write_volume_series  # noqa: E402
from tests.triton_farm import inference_toml, server_entry, start_server, write_repo  # noqa: E402


def throughput(root: Path, pki: PKI, repository: Path, servers: int, studies: list[list[Path]],
               service_seconds: float) -> float:
    """Studies per hour through a node with *servers* Triton servers of a fixed service time."""
    started_servers = [start_server(repository, root / f"triton-{servers}", pki,
                                    env={"CONTOUR_GW_FAILPOINT": f"slow:remote_infer:{service_seconds}"})
                       for _ in range(servers)]
    data_dir = root / f"var-{servers}"
    config = write_config(root / f"gateway-{servers}.toml", data_dir,
                          destinations=[{"name": "tps", "type": "folder"}],
                          routes=[{"name": "ct", "match": {"Modality": "CT"}, "model": "default",
                                   "destinations": ["tps"]}],
                          extra_inference=inference_toml([server_entry(f"gpu{i}", s.url, pki)
                                                          for i, s in enumerate(started_servers)]),
                          extra="[pipeline]\nworkers = 4\n\n[retention]\nkeep_after_delivery_seconds = 3600\n")
    node = start_node(config, root / f"node-{servers}.log")
    try:
        begun = time.monotonic()
        for files in studies:
            subprocess.run([require_tool("storescu"), "-aet", "PACS", "-aec", "CONTOUR_GW", "127.0.0.1",
                            str(node.port), *map(str, files)], check=True, capture_output=True, env=dcmtk_env(),
                           timeout=120)
        exported = data_dir / "export" / "tps"
        arrivals: dict[str, float] = {}
        while len(arrivals) < len(studies):
            for path in exported.glob("*.dcm"):
                arrivals.setdefault(path.name, time.monotonic())
            if time.monotonic() - begun > 60 * len(studies) * service_seconds:
                raise RuntimeError(f"only {len(arrivals)} of {len(studies)} results:\n" + node.log_text()[-3000:])
            time.sleep(0.02)
    finally:
        node.stop()
        for server in started_servers:
            server.stop()
    times = sorted(arrivals.values())
    return (len(times) - 1) / (times[-1] - times[0]) * 3600


def latency(root: Path, pki: PKI, repository: Path, model: str, volume: Volume, runs: int) -> dict[str, Any]:
    """Median seconds per series in place and through one server."""
    server = start_server(repository, root / "triton-latency", pki)
    try:
        config = parse_config({"inference": {"backend": "triton", "servers": [server_entry("a", server.url, pki)]}})
        remote = RemotePredictor(model, REPO / "models" / model, TritonFarm(config.inference))
        local = Predictor(load_model(REPO / "models" / model))
        remote.predict(volume), local.predict(volume)  # warm: sessions, connection, first allocations
        local_s, remote_s = [], []
        for _ in range(runs):
            started = time.perf_counter()
            local.predict(volume)
            local_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            remote.predict(volume)
            remote_s.append(time.perf_counter() - started)
    finally:
        server.stop()
    return {"shape": list(volume.shape), "local_s": statistics.median(local_s),
            "triton_s": statistics.median(remote_s)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--service-seconds", type=float, default=3.0)
    parser.add_argument("--model", default="default", help="model package for the latency part")
    parser.add_argument("--slices", type=int, default=100, help="slices of the 512 x 512 phantom")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--latency-only", action="store_true", help="skip the throughput part (e.g. --model liver, "
                        "the published network of 'make liver')")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pki = make_pki(root / "pki")
        repository = write_repo(root / "repo", names=tuple(sorted({"default", args.model})))
        volume, _ = couch_phantom(shape=(30, 160, 160), spacing=(4.0, 2.6, 2.6))
        studies = [write_volume_series(root / f"study-{i}", volume).files for i in range(args.studies)]
        one = two = 0.0
        if not args.latency_only:
            one = throughput(root, pki, repository, 1, studies, args.service_seconds)
            two = throughput(root, pki, repository, 2, studies, args.service_seconds)
        ct = real_chest_ct(root / "realct", source="lung2")
        volumes = {"phantom": couch_phantom(shape=(args.slices, 512, 512), spacing=(3.0, 0.98, 0.98))[0],
                   "real CT": volume_from_datasets([pydicom.dcmread(path) for path in ct.files])}
        timings = {name: latency(root, pki, repository, args.model, volume, args.runs)
                   for name, volume in volumes.items()}
    ideal = 3600 / args.service_seconds
    if one and two:
        print(f"throughput, {args.studies} studies, service time {args.service_seconds:.1f} s per series "
              f"(ideal {ideal:.0f} studies/h per server)")
        print(f"  1 server : {one:7.0f} studies/h ({one / ideal:.0%} of ideal)")
        print(f"  2 servers: {two:7.0f} studies/h ({two / ideal / 2:.0%} of ideal), ratio {two / one:.2f} "
              f"(target >= 1.8, {'met' if two / one >= 1.8 else 'MISSED'})")
    for name, timing in timings.items():
        timing["overhead"] = round(timing["triton_s"] / timing["local_s"] - 1, 4)
        print(f"latency, model {args.model}, {name} {' x '.join(map(str, timing['shape']))}: local "
              f"{timing['local_s']:.2f} s, triton {timing['triton_s']:.2f} s, overhead {timing['overhead']:+.1%} "
              f"({timing['triton_s'] - timing['local_s']:+.2f} s; target <= 10 %, "
              f"{'met' if timing['overhead'] <= 0.10 else 'MISSED'})")
    figures: dict[str, Any] = {"studies_per_hour_1": round(one), "studies_per_hour_2": round(two),
                               "ratio": round(two / one, 3) if one else None, "latency": timings}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
