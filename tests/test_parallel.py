"""Both CLIs under msrun (two workers on CPU, the tiny model, graph mode): the output folder is byte-identical to a
one-process run's, a run whose rank was killed resumes in one process to the same bytes, and a rank that fails
ends the job with its message in bounded time. Every launch has a free port, its own log folder and a timeout that
kills the whole process group, so a hang fails the test instead of CI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mindone_story import parallel

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "story_diffusion"
RUN, ADAPTER = EXAMPLES / "run.py", EXAMPLES / "run_story_adapter.py"
TIMEOUT = 300  # seconds for one launch; the tiny runs take 20-40 s
# msrun's workers run `python` from PATH; a dead worker is noticed by the scheduler after MS_NODE_TIMEOUT seconds
ENV = {
    **os.environ,
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    "PYTHONPATH": str(ROOT),
    "MS_NODE_TIMEOUT": "10",
}
CHARACTERS = "[Bob] a man with a black suit\n[Alice] a woman in a white shirt"
STORY = "[Bob] wakes up #Bob wakes up\n[Alice] reads a book\n[Bob] has breakfast\n[NC] a city street\n[Bob] and [Alice] meet"
SD_ARGS = ["--sd_model_name", "tiny", "--height", "64", "--width", "64", "--steps", "2", "--id_length", "1"]
SD_ARGS += ["--general_prompt", CHARACTERS, "--read_batch", "2", "--no_progress"]  # later batches [2, 3], [4]
SA_ARGS = ["--story", "a cat on a roof", "a dog in a park", "a bird on a wire", "--rounds", "2", "--steps", "2"]
SA_ARGS += ["--height", "64", "--width", "64", "--seed", "7", "--no_progress"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msrun(script: Path, args: list[str], logs: Path, cwd: Path, workers: int = 2) -> subprocess.Popen:
    cmd = ["msrun", f"--worker_num={workers}", f"--local_worker_num={workers}", f"--master_port={free_port()}"]
    cmd += ["--join=True", f"--log_dir={logs}", str(script), *args]
    return single(cmd, cwd)


def single(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str]:
    """The exit status and output, or the whole process group killed and the test failed at the timeout."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"no exit within {timeout} s (the job hung):\n{out[-3000:]}")
    return proc.returncode, out


def outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_run(a: Path, b: Path) -> None:
    """Every file byte-identical, story.json up to its creation time and the seconds each part took."""
    files_a, files_b = outputs(a), outputs(b)
    assert sorted(files_a) == sorted(files_b)
    for name in files_a:
        if name != "story.json":
            assert files_a[name] == files_b[name], name
    records = []
    for raw in (files_a["story.json"], files_b["story.json"]):
        record = json.loads(raw)
        record.pop("created")
        record["log"] = [{k: v for k, v in e.items() if k not in ("seconds", "resumed")} for e in record["log"]]
        records.append(record)
    assert records[0] == records[1]


def worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of msrun's worker of ``rank`` (a child of the launcher with RANK_ID=rank)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and b"MS_ROLE=MS_WORKER" in env and f"RANK_ID={rank}".encode() in env:
            return int(stat.parent.name)
    return None


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("parallel")


@pytest.fixture(scope="module")
def story_file(work):
    path = work / "story.txt"
    path.write_text(STORY)
    return path


@pytest.fixture(scope="module")
def adapter_reference(work):
    """The one-process Story-Adapter run (graph mode), started first so it runs beside the msrun tests."""
    out = work / "sa_one"
    proc = single([sys.executable, str(ADAPTER), *SA_ARGS, "--output_dir", str(out)], work)
    yield out, proc
    if proc.poll() is None:  # its tests were not selected
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def test_story_diffusion_on_two_ranks_equals_one_process(work, story_file, adapter_reference):
    one, two = work / "sd_one", work / "sd_two"
    args = [*SD_ARGS, "--story", str(story_file)]
    alone = single([sys.executable, str(RUN), *args, "--output_dir", str(one)], work)
    code, out = finish(msrun(RUN, [*args, "--output_dir", str(two)], work / "sd_logs", work))
    assert code == 0, out[-3000:]
    assert finish(alone)[0] == 0
    same_run(one, two)
    record = json.loads((two / "story.json").read_text())
    assert record["progress"]["panels"] == [0, 1, 2, 3, 4] and record["files"][:5] == [
        f"panel_00{i}.png" for i in range(5)
    ]
    logs = {p.stem: p.read_text() for p in (work / "sd_logs").glob("*.log")}
    assert "wrote 5 panels" in logs["worker_0"] and "wrote" not in logs["worker_1"] + logs["scheduler"]  # one writer
    assert "Traceback" not in logs["worker_1"]


def test_story_adapter_on_two_ranks_equals_one_process(work, adapter_reference):
    one, proc = adapter_reference
    two = work / "sa_two"
    code, out = finish(msrun(ADAPTER, [*SA_ARGS, "--output_dir", str(two)], work / "sa_logs", work))
    assert code == 0, out[-3000:]
    assert finish(proc)[0] == 0
    same_run(one, two)
    record = json.loads((two / "story.json").read_text())
    assert [e["reference_encodings"] for e in record["log"]] == [0, 3, 3]  # each reference encoded once, by one rank


def test_a_killed_rank_stops_the_job_and_one_process_resumes_it(work, adapter_reference):
    one, proc = adapter_reference
    assert finish(proc)[0] == 0
    cut = work / "sa_cut"
    job = msrun(ADAPTER, [*SA_ARGS, "--output_dir", str(cut)], work / "cut_logs", work)
    deadline, killed = time.time() + TIMEOUT, None
    while time.time() < deadline and job.poll() is None and killed is None:
        try:
            state = json.loads((cut / "story.json").read_text())["progress"]
        except (FileNotFoundError, json.JSONDecodeError):
            state = None
        if state and state["round"] == 1 and not state["done"] and (pid := worker_pid(job.pid, 1)):
            os.kill(pid, signal.SIGKILL)  # rank 1, mid-round: it holds panels rank 0 has not written
            killed = time.time()
        time.sleep(0.02)
    assert killed is not None, "the run ended before rank 1 could be killed"
    code, out = finish(job)
    assert code != 0 and time.time() - killed < 90, out[-3000:]  # the job stopped, in bounded time
    state = json.loads((cut / "story.json").read_text())["progress"]
    assert not state["done"] and state["round"] >= 1
    resumed = single([sys.executable, str(ADAPTER), "--output_dir", str(cut), "--resume", "--no_progress"], work)
    code, out = finish(resumed)
    assert code == 0, out[-3000:]
    same_run(one, cut)


def test_a_bad_argument_on_one_rank_ends_the_job_with_its_message(work, tmp_path):
    wrapper = tmp_path / "run_elsewhere.py"  # as if rank 1's node lacked the story file
    wrapper.write_text(
        "import os, runpy, sys\n"
        f"sys.path.insert(0, {str(EXAMPLES)!r})\n"
        "if os.environ.get('MS_ROLE') == 'MS_WORKER' and os.environ.get('RANK_ID') == '1':\n"
        "    sys.argv += ['--story', 'missing_on_this_node.txt']\n"
        f"runpy.run_path({str(RUN)!r}, run_name='__main__')\n"
    )
    began = time.time()
    code, out = finish(msrun(wrapper, [*SD_ARGS, "--output_dir", str(tmp_path / "out")], tmp_path / "logs", tmp_path))
    assert code != 0 and time.time() - began < 120, out[-3000:]
    log = (tmp_path / "logs" / "worker_1.log").read_text()
    (line,) = [x for x in log.splitlines() if x.startswith("error:")]
    assert "missing_on_this_node.txt" in line and line.endswith("(rank 1 of 2)"), line
    assert "Traceback" not in log


def test_one_process_is_rank_0_of_1_and_explicit_parallel_needs_msrun(monkeypatch):
    monkeypatch.delenv("MS_ROLE", raising=False)
    world = parallel.start()
    assert (world.rank, world.size, world.root, world.label()) == (0, 1, True, "")
    assert world.share(list(range(5))) == [0, 1, 2, 3, 4] and world.gather({"a": 1}) == [{"a": 1}]
    with pytest.raises(parallel.StoryError, match="msrun"):
        parallel.start(explicit=True)
    two = parallel.World(rank=1, size=3)
    assert two.share(list(range(8))) == [1, 4, 7]  # round-robin: wave k holds items 3k..3k+2
    got = []
    order = parallel.InOrder([2, 3, 4], lambda k, v: got.append((k, v)))
    for item in [(4, "d"), (2, "b"), (3, "c")]:
        order(item)
    assert got == [(2, "b"), (3, "c"), (4, "d")]
