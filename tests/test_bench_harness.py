"""The benchmark harness (cxr.common.bench) on what it promises the bench scripts: the section writer touches one
section, rounds are interleaved fairly, cached inputs are built once, and /proc sampling sees real processes."""
from __future__ import annotations

import json
import os
import sys
import textwrap
import time

import pytest

from cxr.common import bench
from cxr.common.bench import (ChildServer, State, Watch, bench_parser, cached, fastest_cpu, interleaved, rotations,
                              run_child)
from cxr.common.markdown import met, num, publish, replace_section, table

BENCHMARKS = """# Benchmarks

## Alpha (scripts/a.py)

old alpha

### (a) a part of alpha

old part

## Alpha two (scripts/a2.py)

keep me

## Beta

keep me too
"""


# ----------------------------------------------------------------------------- the section writer
def test_replace_section_replaces_that_section_with_its_subsections_and_nothing_else(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(BENCHMARKS)
    replace_section(path, "## Alpha (scripts/a.py)", "## Alpha (scripts/a.py)\n\nnew alpha\n")
    text = path.read_text()
    assert "old alpha" not in text and "old part" not in text and "new alpha" in text
    assert text.count("## Alpha (scripts/a.py)") == 1
    # the neighbours, including one whose heading starts the same way, are byte for byte what they were
    assert text.split("## Alpha two")[1] == BENCHMARKS.split("## Alpha two")[1]
    assert text.index("new alpha") < text.index("## Alpha two") < text.index("## Beta")


def test_a_new_section_is_appended_and_publish_without_write_leaves_the_file_alone(tmp_path, capsys):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(BENCHMARKS)
    publish("## Gamma\n\nfresh\n", path, "## Gamma", write=False)
    assert path.read_text() == BENCHMARKS and "fresh" in capsys.readouterr().out
    publish("## Gamma\n\nfresh\n", path, "## Gamma")
    assert path.read_text() == BENCHMARKS + "\n## Gamma\n\nfresh\n"


def test_table_and_number_helpers():
    assert table(["a", "b"], [[1, "x"], ["", 2.5]]) == ["| a | b |", "|---|---|", "| 1 | x |", "|  | 2.5 |"]
    assert num(12345.678) == "12,345.7" and num(2.0, 0) == "2"
    assert met(True) == "**met**" and met(False) == "**not met**"


# ----------------------------------------------------------------------------- rounds
def test_rotations_let_every_side_go_first_equally_often():
    order = list(rotations(["a", "b", "c"], 3))
    assert [side for _, side in order] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    firsts = [order[i][1] for i in range(0, 9, 3)]
    assert sorted(firsts) == ["a", "b", "c"]
    assert [side for _, side in rotations(["a", "b"], 2, rotate=False)] == ["a", "b", "a", "b"]
    assert [side for _, side in rotations(["spark", "single"], 2)] == ["spark", "single", "single", "spark"]


def test_interleaved_collects_each_sides_result_of_every_round_in_call_order():
    calls = []

    def side(name):
        def run():
            calls.append(name)
            return len(calls)
        return run
    runs = interleaved({"x": side("x"), "y": side("y")}, 3)
    assert calls == ["x", "y", "y", "x", "x", "y"]
    assert runs == {"x": [1, 4, 5], "y": [2, 3, 6]}


def test_fastest_cpu_keeps_the_least_time_per_item():
    ticks = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])   # three rounds on a fake clock: 3, 1 and 2 seconds
    assert fastest_cpu(lambda: None, 3, per=4, clock=lambda: next(ticks)) == 0.25


# ----------------------------------------------------------------------------- cached inputs and state
def test_cached_builds_once_and_returns_the_cached_path_the_second_time(tmp_path):
    built = []

    def build(path):
        built.append(path)
        path.mkdir()
        (path / "done").write_text("ok")
    first = cached(tmp_path / "input", build, tmp_path / "input" / "done")
    second = cached(tmp_path / "input", build, tmp_path / "input" / "done")
    assert first == second == tmp_path / "input" and built == [tmp_path / "input"]


def test_cached_refuses_a_build_that_did_not_finish(tmp_path):
    with pytest.raises(RuntimeError, match="did not leave"):
        cached(tmp_path / "x", lambda path: path.mkdir(), tmp_path / "x" / "marker")


def test_linked_subset_hard_links_the_first_files_once(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.inputs, "CACHE", tmp_path / "cache")
    src = tmp_path / "src"
    for cls in ("A", "B"):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            (src / cls / f"{cls.lower()}_{i:05d}.png").write_bytes(b"x" * (i + 1))
    out = bench.linked_subset(src, 4, "first4")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["A/a_00000.png", "A/a_00001.png", "B/b_00000.png", "B/b_00001.png"]   # classes take turns
    inode = (out / "A" / "a_00000.png").stat().st_ino
    assert inode == (src / "A" / "a_00000.png").stat().st_ino
    assert bench.linked_subset(src, 4, "first4") == out and (out / "A" / "a_00000.png").stat().st_ino == inode


def test_state_keeps_measurements_across_runs_and_redoes_what_it_is_told(tmp_path):
    path = tmp_path / "state.json"
    state = State(path)
    state.save("d:1000", {"wall_s": 1.5}, date="2026-12-04")
    state.save("b", {"files": 3})
    again = State(path, redo=["d"])
    assert again.data == {"d:1000": {"wall_s": 1.5}, "date": "2026-12-04", "b": {"files": 3}}
    assert again.done("b") and not again.done("d:1000") and not again.done("e")
    assert not State(path, redo=["d:1000"]).done("d:1000") and State(path, redo=["d:5000"]).done("d:1000")
    assert not path.with_suffix(".tmp").exists()


def test_bench_parser_has_the_shared_flags():
    args = bench_parser("doc", state="x.json", redo_choices=("a", "b")).parse_args(["--report-only", "--redo", "a"])
    assert args.report_only and args.redo == ["a"] and args.state.endswith("x.json") and not args.no_write
    with pytest.raises(SystemExit):
        bench_parser("doc", state="x.json", redo_choices=("a",)).parse_args(["--redo", "z"])


# ----------------------------------------------------------------------------- /proc sampling of real processes
BURN = textwrap.dedent("""
    import sys, time
    block = bytearray(80 * 1024 * 1024)          # 80 MB, touched so that it is resident
    for i in range(0, len(block), 4096):
        block[i] = 1
    end = time.process_time() + 0.6
    while time.process_time() < end:              # 0.6 s of CPU
        pass
    print("ready", flush=True)
    sys.stdin.readline()                          # stay alive until the parent has read /proc
""")


def test_watch_sees_the_cpu_and_peak_rss_of_a_child_that_burns_cpu(tmp_path):
    import subprocess

    script = tmp_path / "bench_harness_burn.py"
    script.write_text(BURN)
    with Watch({"burn": r"bench_harness_burn", "none": r"no-such-process-xyz"}, interval=0.05) as w:
        child = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.15)   # one more poll while it is alive
    child.stdin.write("\n")
    child.stdin.close()
    child.wait(timeout=10)
    assert w.seen == {"burn": 1, "none": 0}
    assert 0.5 <= w.cpu_s["burn"] <= w.seconds + 0.5 and w.cpu_s["none"] == 0
    assert w.peak_mb["burn"] >= 80 and w.peak_mb["none"] == 0
    assert w.self_cpu_s < w.cpu_s["burn"]   # the child's CPU is not counted as this process's


def test_run_child_returns_the_json_answer_its_cpu_and_rss_samples(tmp_path):
    code = ("import json, time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
            "time.sleep(0.3)\nprint('noise')\nprint(json.dumps({'answer': 42}))")
    run = run_child([sys.executable, "-c", code], tmp_path / "child.log", sample=0.05)
    assert run.answer == {"answer": 42}
    assert run.cpu_s >= 0.25 and run.wall_s >= 0.6
    assert len(run.rss_mb) >= 3 and max(run.rss_mb) > 5 and len(run.loads) == len(run.rss_mb)
    assert "noise" in (tmp_path / "child.log").read_text()
    with pytest.raises(RuntimeError, match="failed .exit 3"):
        run_child([sys.executable, "-c", "import sys; print('why', file=sys.stderr); sys.exit(3)"],
                  tmp_path / "bad.log")


def test_child_server_keeps_one_process_across_requests_and_reports_its_errors(tmp_path):
    script = tmp_path / "echo_server.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys
        from cxr.common.bench import serve
        arg = json.loads(sys.argv[sys.argv.index("--serve") + 1])
        def handle(req):
            if req.get("fail"):
                raise ValueError("boom")
            return {"x": req["x"], "arg": arg, "pid": os.getpid()}
        sys.exit(serve(handle, int(sys.argv[sys.argv.index("--reply-fd") + 1])))
    """))
    server = ChildServer(script, "echo", {"k": 1}, tmp_path / "echo.log", cwd=tmp_path)
    try:
        first, second = server.call(x=1), server.call(x=2)
        assert (first["x"], second["x"], first["arg"]) == (1, 2, {"k": 1}) and first["pid"] == second["pid"]
        with pytest.raises(RuntimeError, match="boom"):
            server.call(fail=True)
        assert server.call(x=3)["x"] == 3   # still serving after an error
    finally:
        server.close()
    assert server.proc.returncode == 0


def test_the_package_keeps_the_old_import_path_of_the_module():
    for name in ("Timer", "WorkerMemory", "cpu_seconds", "cpu_delta", "matching", "reset_peak_rss", "status_kb",
                 "versions", "machine", "linked_subset", "input_files", "CACHE", "SPARK_WORKERS", "SPARK_JVM"):
        assert hasattr(bench, name), name
    assert json.loads(json.dumps(bench.versions(("numpy",))))["python"]
    assert os.cpu_count() and bench.machine().startswith(f"{os.cpu_count()} cores")
