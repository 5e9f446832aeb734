"""Every ``qgdist bench KIND`` run as a user runs it (a subprocess) at the tiniest size its flags allow; its printed
table and its JSON are parsed: the expected rows and columns are there, every figure is finite (and positive where
it is a time, a rate or a size) and the rows counted are the rows asked for. None of these is a timing test.

``bench scale`` is in test_scale.py, ``bench physics`` in tests/generate/test_pythia.py (both as commands too).

The benches that use Ray (convert, predict, train) join one Ray cluster started for this file (``$RAY_ADDRESS``)
instead of each run starting a private Ray: eight Ray starts fewer (bench predict alone took 46 s instead of
88). A private Ray's start is what every other command test runs; here it is the benches' parsing that counts.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.cluster.raykit import PRIVATE_RAY_SETTINGS, RayNode
from tests.commands import assert_finite, markdown_rows, number, qgdist

TINY = ["--model-arg", "conv_params=[[4, [8, 8]]]", "--model-arg", "fc_params=[[16, 0.1]]"]


@pytest.fixture(scope="module")
def ray_cluster():
    """``{"RAY_ADDRESS": ...}`` of a 2-CPU Ray head started for this file's Ray benches, stopped after them; its
    processes have the environment of a private Ray's."""
    head = RayNode(num_cpus=2, ray_settings=PRIVATE_RAY_SETTINGS)
    try:
        yield {"RAY_ADDRESS": head.gcs_address}
    finally:
        head.stop(remove_temp_dir=True)


def joined_line(printed: str, address: str) -> bool:
    """Whether the bench said its runs joined the cluster at ``address`` (so the figures are read as such)."""
    return f"Ray: every Ray run joins the cluster at RAY_ADDRESS={address} instead of starting a private Ray" in printed


def test_bench_knn_prints_one_timed_row_per_method_width_and_k():
    dims, ks, batch = (2, 4), (3,), 4
    out = qgdist("bench", "knn", "--batch-size", batch, "--max-particles", 8, "--dims", "2,4", "--k", "3",
                 "--repeats", 1).stdout.splitlines()
    assert out[0].startswith(f"kNN on cpu, batch {batch} x P ")
    assert out[1].split() == ["D", "k", "method", "ms", "jets/s", "vs", "ours", "agree"]
    row = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\S.*?)\s+([\d.]+)\s+(\d+)\s+([\d.]+)x\s*([\d.]*)$")
    rows = [row.match(line) for line in out[2:]]
    assert all(rows), [line for line, m in zip(out[2:], rows) if not m]
    methods = ["ours", "ours int64 keys", "ours chunked", "packed groups", "cdist+topk", "shift trick", "+ edge_index"]
    assert [(int(m[1]), int(m[2]), m[3]) for m in rows] == [(d, k, name) for d in dims for k in ks for name in methods]
    for m in rows:
        ms, jets_s, vs_ours = number(m[4]), number(m[5]), number(m[6])
        assert ms > 0 and jets_s > 0 and vs_ours > 0, m[0]
        if m[3] == "ours":
            assert vs_ours == 1.0 and m[7] == "1.000"
        if m[3].startswith("ours") or m[3] == "packed groups":   # the same neighbours, selected another way
            assert number(m[7]) == 1.0, m[0]
        elif m[3] == "+ edge_index":
            assert m[7] == ""
        else:
            assert 0 <= number(m[7]) <= 1, m[0]


@pytest.mark.slow   # ~6 s: imports and one step of each model
def test_bench_step_prints_one_row_per_model_of_both_kinds():
    models, batch = ("particlenet-lite", "resnet15"), 2
    out = qgdist("bench", "step", "--model", ",".join(models), "--batch-size", batch, "--max-particles", 8,
                 "--image-size", 16, "--steps", 1, "--warmup", 0, "--threads", 1).stdout.splitlines()
    assert out[0].startswith("train step on cpu (CPU, 1 threads")
    assert out[1].split() == ["model", "impl", "params", "batch", "shape", "ms/step", "jets/s", "ratio", "cpu",
                              "ms/step", "cpu", "ratio"]
    row = re.compile(r"^(\S+)\s+(qgdist)\s+(\d+)\s+(\([\d, ]+\))\s+([\d.]+)\s+(\d+)\s+([\d.]+)x\s+([\d.]+)\s+"
                     r"([\d.]+)x$")
    rows = [row.match(line) for line in out[2:2 + len(models)]]
    assert all(rows), out
    assert [m[1] for m in rows] == list(models)
    shapes = {m[1]: tuple(int(v) for v in m[4].strip("()").split(",")) for m in rows}
    assert shapes["particlenet-lite"][0] == batch and shapes["particlenet-lite"][2] == 2
    assert 1 <= shapes["particlenet-lite"][1] <= 8   # trimmed to the batch's longest jet
    assert shapes["resnet15"] == (batch, 3, 16, 16)
    for m in rows:
        params, ms, jets_s, ratio, cpu_ms, cpu_ratio = (number(m[i]) for i in (3, 5, 6, 7, 8, 9))
        assert params > 0 and ms > 0 and jets_s >= 0 and ratio > 0 and cpu_ms > 0 and cpu_ratio > 0, m[0]
    assert (number(rows[0][7]), number(rows[0][9])) == (1.0, 1.0)   # ratios are to the first model
    assert out[2 + len(models)].startswith("cpu ms/step: process CPU time")


@pytest.mark.slow   # Ray: the ray method at 1x and 2x of both formats, on the file's cluster; ~45 s
def test_bench_convert_measures_every_method_on_the_rows_it_made(tmp_path, ray_cluster):
    jets, ef_jets, scale = 4, 5, 2
    done = qgdist("bench", "convert", "--jets", jets, "--ef-jets", ef_jets, "--scale", scale, "--repeat", 1,
                  "--workdir", tmp_path, env=ray_cluster)
    res = json.loads((tmp_path / "bench_convert.json").read_text())
    assert assert_finite({k: res[k] for k in ("inputs", "methods", "summary")}, "bench_convert.json") > 100
    sizes = {"1x": 1, f"{scale}x": scale}
    expected = {f"cms/{size}/{m}" for size in sizes for m in ("arrow_read", "pyarrow", "local", "ray")} | {
        "cms/1x/seed"} | {f"energyflow/{size}/{m}" for size in sizes for m in ("npz_read", "numpy", "local", "ray")}
    assert set(res["methods"]) == expected
    for name, r in res["methods"].items():
        fmt, size, method = name.split("/")
        rows = (jets if fmt == "cms" else ef_jets) * sizes[size]
        assert res["inputs"][f"{fmt}/{size}"]["rows"] == rows
        assert r["rows"] == rows, name   # every method read (and the writers wrote) every row made
        assert r["runs"] == 1
        for key in ("loop_s", "wall_s", "startup_s", "loop_rows_per_s", "peak_pss_mb", "peak_rss_mb", "sum_hwm_mb"):
            assert r[key] > 0, (name, key)
        assert ("bytes_per_jet" in r) == (not method.endswith("_read")), name   # the readers write nothing
        assert r.get("bytes_per_jet", 1) > 0
        assert ("loop_cpu_s" in r) == (method != "ray"), name   # Ray's workers' CPU is not the method's own
        assert r.get("ray_cpus", 2) == 2, name   # the joined cluster's CPUs
    for fmt, s in res["summary"].items():
        assert s["1x"]["ray_rows_per_s"] == res["methods"][f"{fmt}/1x/ray"]["loop_rows_per_s"]
    assert "local_vs_seed_1x" in res["summary"]["cms"]

    lines = done.stdout.splitlines()
    assert re.match(r"^\d+ CPUs; load average before/after each round: [\d. ]+ -> [\d. ]+; medians of 1 ", lines[0])
    header = ["format/size/method", "rows", "start-up s", "loop s", "loop CPU s", "loop rows/s", "KB/jet",
              "peak PSS MB", "peak RSS MB", "sum HWM MB"]
    at = [lines[1].find(h) for h in header]
    assert -1 not in at and at == sorted(at), lines[1]
    table = lines[2:2 + len(expected)]
    assert [ln.split()[0] for ln in table] == list(res["methods"])
    for ln in table:
        name, *cells = ln.split()
        assert len(cells) == len(header) - 1, ln
        for col, cell in zip(header[1:], cells):
            if cell == "-":   # not measured: Ray's workers' CPU time, the output size of a method writing none
                assert (col, name.split("/")[2]) in {("loop CPU s", "ray"), ("KB/jet", "arrow_read"),
                                                     ("KB/jet", "npz_read")}, (ln, col)
            else:
                assert number(cell) >= 0, (ln, col)
        assert number(cells[0]) == res["methods"][name]["rows"]
    summary = "\n".join(lines[2 + len(expected):])
    for fmt in ("cms", "energyflow"):
        for size in sizes:
            assert re.search(rf"^{fmt} {size}: read ceiling \d+ rows/s .* ray \(2 CPUs\) [\d.]+x = \d+ rows/s", summary,
                             re.M), summary
        assert summary.count(f"{fmt} peak memory {scale}x vs 1x") == 2
    assert "cms 1x: local (one core)" in summary
    assert joined_line(summary, ray_cluster["RAY_ADDRESS"]) and res["joined_ray"] in summary
    assert json.loads(done.stdout[done.stdout.index("\n{") + 1:])["methods"] == res["methods"]


@pytest.mark.slow   # ~35 s: six measurement processes, shuffle quality over 100 batches of six datasets
def test_bench_loader_reads_every_train_jet_in_both_layouts(tmp_path):
    jets, image_jets, batch, epochs = 24, 6, 4, 1
    out = qgdist("bench", "loader", "--jets", jets, "--image-jets", image_jets, "--batch", batch, "--epochs", epochs,
                 "--repeat", 1, "--workdir", tmp_path).stdout
    res = json.loads((tmp_path / "bench_loader.json").read_text())
    assert set(res["formats"]) == {"cloud", "image"}
    assert assert_finite(res["formats"], "bench_loader.json") > 100
    for kind, made in (("cloud", jets), ("image", image_jets)):
        e = res["formats"][kind]
        manifest = json.loads((tmp_path / f"toy_{kind}_{made}" / "manifest.json").read_text())
        assert manifest["rows"]["in"] == manifest["rows"]["written"] == made   # rows in = rows written
        train = manifest["splits"]["train"]["samples"]
        t = e["throughput"]
        assert set(t) == {"v2", "v1", "v2+verify"}
        assert t["v2"]["jets"] == t["v1"]["jets"] == t["v2+verify"]["jets"], kind   # both loaders, same jets
        assert train - batch < t["v2"]["jets"] / epochs <= train, (kind, train)   # at most the last partial batch
        for layout, r in t.items():
            assert len(r["runs"]) == 1
            for key in ("jets_per_cpu_s", "jets_per_wall_s", "peak_rss_mb", "rss_before_mb"):
                assert r[key] > 0, (kind, layout, key)
        b = e["bytes_per_jet"]
        assert b["v2"] > 0 and b["v1"] > 0 and b["source"] > 0
        assert set(e["shuffle"]) == {"as is", "label-sorted shards", "one-class shards"}
        for name, q in e["shuffle"].items():
            for layout in ("v2", "v1", "ideal"):
                s = q[layout]
                assert s["batches"] >= 100 and 0 < s["max_file_share"] <= 1 and -1 <= s["label_autocorr_lag1"] <= 1
                assert s["batch_quark_fraction_std"] >= 0 and s["binomial_std"] > 0

    lines = out.splitlines()
    assert lines[1].split() == ["format", "layout", "jets/cpu-s", "jets/wall-s", "peak", "RSS", "MB", "RSS", "before",
                                "bytes/jet", "target"]
    for kind in ("cloud", "image"):
        e = res["formats"][kind]
        for layout in ("v2", "v1"):
            (line,) = [ln for ln in lines if ln.split()[:2] == [kind, layout]]
            cells = line.split()[2:7]
            assert [number(c) for c in cells[:2]] == [round(e["throughput"][layout][k]) for k in
                                                       ("jets_per_cpu_s", "jets_per_wall_s")], line
            assert number(cells[4]) == round(e["bytes_per_jet"][layout])
        (verify,) = [ln for ln in lines if ln.split()[:2] == [kind, "verify"]]
        assert re.search(r"--verify-shards: [+-]\d+\.\d\d CPU-s over 1 epochs \([+-][\d.]+%\), every train shard "
                         r"hashed once \([\d.]+ MB, ([\d.]+|n/a) MB per extra CPU-s\)", verify), verify
        (source,) = [ln for ln in lines if ln.split()[:2] == [kind, "source"]]
        assert number(source.split()[2]) == round(e["bytes_per_jet"]["source"])
        assert any(ln.startswith(f"{kind:6} schema 2 / schema 1: ") for ln in lines)
    quality = [ln for ln in lines if re.match(r"^  (cloud|image) ", ln)]
    assert len(quality) == 2 * 3 * 3
    for ln in quality:
        assert re.search(r"[\d.]+ \| [+-][\d.]+ \| [\d.]+ vs [\d.]+  \(\d+ batches\)$", ln), ln


@pytest.mark.slow   # Ray: three `qgdist predict` runs on the file's cluster, ~45 s
def test_bench_predict_scores_every_row_of_each_input(tmp_path, ray_cluster):
    jets, scale = 50, 2   # 50 is the least the bench makes
    out = qgdist("bench", "predict", "--model", "particlenet-lite", "--jets", jets, "--scale", scale, "--workers", 1,
                 "--batch-size", 16, "--workdir", tmp_path, env=ray_cluster).stdout
    assert joined_line(out, ray_cluster["RAY_ADDRESS"]), out
    res = json.loads((tmp_path / "bench_predict.json").read_text())
    assert res["config"]["models"] == ["particlenet-lite"]
    rows = res["results"]["particlenet-lite"]
    assert list(rows) == ["raw 1x", f"raw {scale}x", "shards 1x"]
    assert assert_finite(rows, "bench_predict.json") == 3 * 7
    assert [r["jets"] for r in rows.values()] == [jets, jets * scale, jets]   # every row in is scored
    for name, r in rows.items():
        for key in ("jets_per_s", "ray_seconds", "wall_seconds", "peak_pss_mb", "peak_rss_mb", "sum_hwm_mb"):
            assert r[key] > 0, (name, key)
        assert r["ray_seconds"] < r["wall_seconds"]

    header = ["model", "input", "jets", "jets/s (loop)", "Ray start s", "wall s", "peak PSS MB", "peak RSS MB",
              "sum HWM MB"]
    table = markdown_rows(out, header)
    assert [(t["model"], t["input"]) for t in table] == [("particlenet-lite", n) for n in rows] + [
        ("particlenet-lite", f"memory raw {scale}x / 1x")]
    for t, r in zip(table, rows.values()):
        assert int(t["jets"]) == r["jets"] and number(t["jets/s (loop)"]) == round(r["jets_per_s"])
        assert all(number(t[c]) > 0 for c in header[4:])
    ratios = table[-1]
    assert [ratios[c] for c in header[2:6]] == ["", "", "", ""]
    assert number(ratios["peak PSS MB"]) == pytest.approx(rows[f"raw {scale}x"]["peak_pss_mb"] /
                                                          rows["raw 1x"]["peak_pss_mb"], abs=0.006)


@pytest.mark.slow   # Ray Train: a 1-worker and a 2-worker fit, and the plain-loop ceiling beside them
def test_bench_train_reports_both_configurations_and_the_ceiling(ray_cluster):
    out = qgdist("bench", "train", "--jets", 400, "--workers", 2, "--batch-size", 16, "--repeats", 1, *TINY,
                 env=ray_cluster).stdout
    assert joined_line(out, ray_cluster["RAY_ADDRESS"]), out
    assert ("model particlenet-lite, batch 16 per worker, 1 thread(s) per worker, 1 epoch(s), 1 interleaved repeats"
            in out.splitlines()), out
    rate = r"\s*(\d+) jets/s \(range (\d+)-(\d+)\)"
    t1 = re.search(r"^  T\(1\)  1 worker  " + rate + r"   first step\s+([\d.]+) s after fit\(\)$", out, re.M)
    t2 = re.search(r"^  T\(2\)  2 workers " + rate + r"   first step\s+([\d.]+) s after fit\(\)$", out, re.M)
    assert t1 and t2, out
    for m in (t1, t2):
        median, low, high, first = (number(v) for v in m.groups())
        assert 0 < low <= median <= high and first > 0   # one repeat: the range is the median
        assert low == high == median
    eff = re.search(r"^  scaling efficiency T\(2\) / \(2 x T\(1\)\) = ([\d.]+)  \(per pair: ([\d.]+)\)$", out, re.M)
    assert eff and number(eff[1]) > 0 and eff[1] == eff[2], out
    assert number(eff[1]) == pytest.approx(number(t2[1]) / (2 * number(t1[1])), abs=0.02)
    ceiling = re.search(r"^  machine ceiling \(plain loop, no Ray, no DDP\): 1 process" + rate + r", 2 at once"
                        + rate + r" in all -> ([\d.]+); DDP keeps ([\d.]+) of it$", out, re.M)
    assert ceiling and all(number(v) > 0 for v in ceiling.groups()), out
    fixed = re.search(r"^  Ray fixed cost: ray.init ([\d.]+) s; fit\(\) to first step ([\d.]+) s \(1 worker\) / "
                      r"([\d.]+) s \(2\); fit\(\) total ([\d.]+) / ([\d.]+) s$", out, re.M)
    assert fixed and all(number(v) > 0 for v in fixed.groups()), out
    assert number(fixed[4]) >= number(fixed[2]) and number(fixed[5]) >= number(fixed[3])
    assert re.search(r"^  load average \(1/5/15 min\) before [\d./]+, after [\d./]+; \d+ CPUs$", out, re.M)


def test_bench_train_refuses_an_epoch_too_short_to_time_before_starting_ray():
    """Three steps per epoch are warm-up, left out of the rate: fewer would leave no figure (once a KeyError)."""
    done = qgdist("bench", "train", "--jets", 100, "--workers", 2, "--batch-size", 16, *TINY, timeout=300, expect=2)
    assert done.stderr.splitlines()[0] == ("qgdist bench train: jets: 79 train jets give 2 steps per epoch on 2 "
                                           "workers x 16 jets; the first 3 are warm-up, not timed: give more --jets "
                                           "or a smaller --batch-size")
