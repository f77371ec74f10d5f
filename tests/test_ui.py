"""loralab ui: the dashboard over run and sweep folders, through its HTTP API and in a real browser (Chromium)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import opposite_records, run_cli, tiny_overrides

pytest.importorskip("fastapi", reason="needs the ui extra: pip install 'loralab[ui]'")
pytest.importorskip("httpx", reason="the API tests use Starlette's TestClient, which needs httpx")

from fastapi.testclient import TestClient  # noqa: E402

from loralab.ui import create_app  # noqa: E402
from loralab.ui.jobs import Busy, CompareJobs  # noqa: E402
from loralab.ui.server import open_socket  # noqa: E402

BASE = "http://127.0.0.1:8765"


# ---------------------------------------------------------------- run folders written by hand

def write_run(folder: Path, *, r: int = 8, steps: int = 10, finished: bool = True, model: str = "tiny-model",
              extra: dict | None = None) -> Path:
    """A run folder as loralab writes it (config.yaml, metrics.jsonl, summary.json, adapter/), without training."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"model:\n  name_or_path: {json.dumps(model)}\nlora:\n  r: {r}\n  alpha: {2 * r}\n"
                                        "train:\n  learning_rate: 0.001\n  epochs: 1\ndata:\n  path: d.json\n")
    lines = [{"step": 0, "eval_loss": 4.0}] + [{"step": s, "loss": 4.0 - s / (r + 2)} for s in range(1, steps + 1)]
    lines.append({"step": steps, "eval_loss": 4.0 - steps / (r + 2)})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if finished:
        (folder / "adapter").mkdir()
        (folder / "adapter" / "adapter_config.json").write_text("{}")
        summary = {"status": "finished", "model": model, "steps": steps, "train_time_s": 1.5, "base_eval_loss": 4.0,
                   "best_eval_loss": lines[-1]["eval_loss"], "final_eval_loss": lines[-1]["eval_loss"], **(extra or {})}
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture()
def folders(tmp_path) -> tuple[Path, Path]:
    runs, sweeps = tmp_path / "runs", tmp_path / "sweeps"
    write_run(runs / "good", r=8)
    (runs / "good" / "eval.json").write_text(json.dumps({"base": {"exact_match": 0.0, "rouge_l": 0.25, "chrf": 10.0, "bleu": 2.0},
                                                         "adapter": {"exact_match": 0.5, "rouge_l": 0.75, "chrf": 60.0, "bleu": 30.0},
                                                         "n": 2, "data": "eval split", "checkpoint": "adapter"}))
    predictions = [{"row": 3, "prompt": "Give the opposite of hot.", "reference": "cold", "base": "warm", "adapter": "cold",
                    "base_scores": {"chrf": 10.0}, "adapter_scores": {"chrf": 100.0}},
                   {"row": 7, "prompt": "Give the opposite of up.", "reference": "down", "base": "down", "adapter": "dawn",
                    "base_scores": {"chrf": 100.0}, "adapter_scores": {"chrf": 40.0}}]
    (runs / "good" / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    torn = write_run(runs / "torn", r=4, finished=False)
    with (torn / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 11, "lo\n[1, 2]\n{"step": 12, "loss": 1.0}\n{"step": 13, "lo')  # 2 bad, 1 being written
    half = write_run(runs / "half", finished=False)
    (half / "summary.json").write_text('{"status": "finis')  # torn by a crash (loralab itself writes atomically)
    (runs / "noconfig").mkdir()
    (runs / "noconfig" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (runs / "badyaml").mkdir()
    (runs / "badyaml" / "config.yaml").write_text("model: [unclosed\n")
    (runs / "mlruns").mkdir()  # not a run: not listed
    sweep = sweeps / "grid"
    for r in (4, 8):
        write_run(sweep / f"r{r}", r=r)
    (sweep / "sweep.yaml").write_text("name: grid\nmetric: eval_loss\ngrid:\n  lora.r: [4, 8, 16]\n")
    (sweep / "failed").mkdir()
    (sweep / "failed" / "r16.json").write_text(json.dumps({"run": "r16", "stage": "train", "reason": "out of memory"}))
    return runs, sweeps


def client(runs: Path, sweeps: Path) -> TestClient:
    return TestClient(create_app(runs, sweeps), base_url=BASE)


def rows_by_id(data: dict) -> dict[str, dict]:
    return {row["id"]: row for row in data["runs"]}


# ---------------------------------------------------------------- what the pages and the API show

def test_lists_every_run_and_sweep_with_bad_folders_marked(folders):
    runs = rows_by_id(client(*folders).get("/api/runs").json())
    assert set(runs) == {"good", "torn", "half", "noconfig", "badyaml", "grid/r4", "grid/r8", "grid/r16"}
    good = runs["good"]
    assert good["status"] == "finished" and good["model"] == "tiny-model" and good["data"] == "d.json"
    assert good["hyperparameters"]["r"] == 8 and good["hyperparameters"]["lr"] == 0.001
    assert good["eval_loss"] == {"base": 4.0, "best": pytest.approx(4 - 10 / 10), "final": pytest.approx(4 - 10 / 10)}
    assert good["eval_scores"]["rouge_l"] == 0.75 and good["train_time_s"] == 1.5
    assert runs["torn"]["status"] == "training"  # no summary, files just written
    assert runs["torn"]["steps"] == 12
    assert runs["torn"]["notes"] == ["metrics.jsonl: 2 unreadable lines skipped (torn by a crash, or not JSON)"]
    assert runs["half"]["status"] == "unreadable"
    assert any(n.startswith("summary.json is not valid JSON") for n in runs["half"]["notes"])
    assert runs["noconfig"]["notes"] == ["no config.yaml: not a complete loralab run folder"]
    assert runs["badyaml"]["status"] == "unreadable"
    assert "config.yaml is not valid YAML (half-written or damaged): line 2" in runs["badyaml"]["notes"][0]
    assert runs["grid/r16"]["status"] == "failed" and "out of memory" in runs["grid/r16"]["notes"][0]

    page = client(*folders).get("/")
    assert page.status_code == 200
    for text in ("good", "torn", "unreadable", "summary.json is not valid JSON", "grid", "out of memory"):
        assert text in page.text


def test_a_run_that_stopped_long_ago_is_not_shown_as_training(folders):
    old = time.time() - 3600
    for name in ("config.yaml", "metrics.jsonl"):
        os.utime(folders[0] / "torn" / name, (old, old))
    row = rows_by_id(client(*folders).get("/api/runs").json())["torn"]
    assert row["status"] == "stopped"
    assert any("loralab train --resume" in note for note in row["notes"])


def table(page: str, table_id: str) -> str:
    """The HTML of one table of a page."""
    return page.split(f'id="{table_id}"')[1].split("</table>")[0]


def test_run_page_eval_table_predictions_filter_and_curves(folders):
    http = client(*folders)
    page = http.get("/run", params={"id": "good"}).text
    scores = table(page, "eval-table")
    assert "exact_match" in scores and "+0.5" in scores and "+50" in scores  # adapter minus base
    shown = table(page, "predictions-table")
    assert "Give the opposite of hot." in shown and "Give the opposite of up." in shown
    better = table(http.get("/run", params={"id": "good", "show": "better"}).text, "predictions-table")
    assert "opposite of hot" in better and "opposite of up" not in better
    worse = table(http.get("/run", params={"id": "good", "show": "worse"}).text, "predictions-table")
    assert "opposite of up" in worse and "opposite of hot" not in worse
    found = http.get("/run", params={"id": "good", "q": "HOT"}).text
    assert "1 of 2 examples" in found and "opposite of up" not in table(found, "predictions-table")
    png = http.get("/curves.png", params={"run": "good"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG") and _coloured_pixels(png.content) > 500
    overlay = http.get("/curves.png", params={"run": ["good", "grid/r4", "grid/r8"]})
    assert _coloured_pixels(overlay.content) > _coloured_pixels(png.content)  # three curves drawn, not one


def _coloured_pixels(png: bytes) -> int:
    """Pixels that are neither white nor grey: the curves (matplotlib's default colours)."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    return sum(1 for r, g, b in image.getdata() if max(r, g, b) - min(r, g, b) > 60)


def test_overlay_shows_config_differences(folders):
    page = client(*folders).get("/overlay", params={"run": ["grid/r4", "grid/r8", "nope"]}).text
    assert "No run nope" in page
    differences = table(page, "config-differences")
    assert "lora.r" in differences and "lora.alpha" in differences and "train.learning_rate" not in differences


def test_sweep_page_comparison_table(folders):
    page = client(*folders).get("/sweep", params={"name": "grid"}).text
    runs = table(page, "sweep-table")
    assert runs.index("r4") < runs.index("r8") < runs.index("r16")
    assert "★ best" in runs.split(">r4</a>")[1].split("</tr>")[0]  # r4 reached the lowest eval loss (2.33)
    assert "out of memory" in runs
    assert "Best run by eval_loss (lower is better)" in page


def test_run_content_is_escaped_never_executed(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "x", model="<script>alert(1)</script>")
    http = client(runs, tmp_path / "sweeps")
    for page in (http.get("/").text, http.get("/run", params={"id": "x"}).text):
        assert "<script>alert(1)</script>" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    csp = http.get("/").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_ids_outside_the_served_folders_are_refused(folders, tmp_path):
    write_run(tmp_path / "secret")
    http = client(*folders)
    for run_id in ("../secret", "..", "/etc", "grid/../../secret", ".hidden", "grid/r4/adapter"):
        assert http.get("/run", params={"id": run_id}).status_code == 404
        assert http.get("/api/run", params={"id": run_id}).status_code == 404
    assert http.get("/sweep/file", params={"name": "grid", "file": "../../secret/config.yaml"}).status_code == 404


def test_missing_folders_are_a_message_not_an_error(tmp_path):
    page = client(tmp_path / "nothing", tmp_path / "none").get("/")
    assert page.status_code == 200
    assert "does not exist yet" in page.text and "loralab train" in page.text


def test_other_hosts_and_cross_site_posts_are_refused(folders):
    http = client(*folders)
    assert http.get("/", headers={"host": "evil.example"}).status_code == 421  # DNS rebinding
    refused = http.post("/compare", data={"id": "good", "prompts": "hi"}, headers={"origin": "http://evil.example"})
    assert refused.status_code == 403
    cross_site = http.post("/compare", data={"id": "good", "prompts": "hi"}, headers={"sec-fetch-site": "cross-site"})
    assert cross_site.status_code == 403 and "another site" in cross_site.text


def test_compare_refusals_are_messages(folders):
    http = client(*folders)
    no_prompt = http.post("/compare", data={"id": "good", "prompts": " \n "})
    assert no_prompt.status_code == 400 and "no prompt given" in no_prompt.text
    not_trained = http.post("/compare", data={"id": "torn", "prompts": "hi"})
    assert not_trained.status_code == 400 and "has no trained adapter yet" in not_trained.text
    bad_tokens = http.post("/compare", data={"id": "good", "prompts": "hi", "max_new_tokens": "lots"})
    assert bad_tokens.status_code == 400 and "whole number" in bad_tokens.text


def test_one_comparison_at_a_time(tmp_path, monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(CompareJobs, "_work", lambda self, job: (setattr(job, "status", "running"), release.wait(10),
                                                                 setattr(job, "status", "done")))
    jobs = CompareJobs()
    first = jobs.start("a", tmp_path, ["hi"])
    with pytest.raises(Busy, match="a comparison on a is still running"):
        jobs.start("b", tmp_path, ["hi"])
    release.set()
    for _ in range(100):
        if not first.active:
            break
        time.sleep(0.05)
    assert jobs.start("b", tmp_path, ["hi"]).run_id == "b"


def test_port_in_use_and_remote_host_are_clear_errors(tmp_path):
    taken = open_socket("127.0.0.1", 0)
    port = taken.getsockname()[1]
    try:
        code, out = run_cli("ui", "--runs", tmp_path, "--port", port)
    finally:
        taken.close()
    assert code == 1 and f"port {port} on 127.0.0.1 is already in use" in out and "--port 0" in out
    code, out = run_cli("ui", "--host", "0.0.0.0", "--port", 0)
    assert code == 1 and "no authentication" in out and "--allow-remote" in out


def test_missing_web_packages_name_the_extra(tmp_path, monkeypatch):
    from loralab.ui import server

    real = server.importlib.util.find_spec
    monkeypatch.setattr(server.importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    code, out = run_cli("ui", "--runs", tmp_path)
    assert code == 1 and "loralab ui needs uvicorn: pip install 'loralab[ui]'" in out


# ---------------------------------------------------------------- real runs, a real server, a real browser

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir) -> tuple[Path, Path]:
    """Two tiny trained runs (preflight report, curves with base eval loss), one evaluated, also as a sweep."""
    from loralab.checks import fast_preflight
    from loralab.config import build_config
    from loralab.evaluation import evaluate_run
    from loralab.generation import GenerationSettings
    from loralab.training import train

    root = tmp_path_factory.mktemp("dashboard")
    data = root / "opposites.json"
    data.write_text(json.dumps(opposite_records()), encoding="utf-8")
    runs, sweeps = root / "runs", root / "sweeps"
    for r in (4, 8):
        config = build_config({}, tiny_overrides(tiny_llama_dir, data, runs, name=f"r{r}",
                                                 **{"lora.r": r, "train.max_steps": 6, "train.eval_steps": 3}))
        train(config, progress=False, preflight=fast_preflight)
    evaluate_run(runs / "r8", limit=3, settings=GenerationSettings(max_new_tokens=6), progress=False)
    for r in (4, 8):
        shutil.copytree(runs / f"r{r}", sweeps / "grid" / f"r{r}")
    (sweeps / "grid" / "sweep.yaml").write_text("name: grid\nmetric: eval_loss\ngrid:\n  lora.r: [4, 8]\n")
    write_run(runs / "live", finished=False, steps=3)
    return runs, sweeps


def test_real_runs_through_the_api(trained):
    http = client(*trained)
    runs = rows_by_id(http.get("/api/runs").json())
    assert runs["r8"]["status"] == runs["r4"]["status"] == "finished"
    summary = json.loads((trained[0] / "r8" / "summary.json").read_text())
    assert runs["r8"]["eval_loss"]["base"] == summary["base_eval_loss"] and summary["base_eval_loss"] is not None
    detail = http.get("/api/run", params={"id": "r8"}).json()
    assert [c["name"] for c in detail["checks"]["checks"]][:2] == ["tokenizer", "data_hygiene"]
    page = http.get("/run", params={"id": "r8"}).text
    assert 'id="checks-table"' in page and "label_masking" in page


def test_compare_from_the_page_loads_the_run_and_answers(trained):
    http = client(*trained)
    response = http.post("/compare", data={"id": "r8", "prompts": "Give the opposite of hot.\nGive the opposite of up.",
                                           "max_new_tokens": "5"}, follow_redirects=False)
    assert response.status_code == 303
    job_id = response.headers["location"].split("id=")[1]
    for _ in range(600):
        job = http.get("/api/job", params={"id": job_id}).json()
        if job["status"] not in ("queued", "running"):
            break
        time.sleep(0.1)
    assert job["status"] == "done", job
    from loralab.evaluation import compare_prompts
    from loralab.generation import GenerationSettings

    expected = compare_prompts(trained[0] / "r8", ["Give the opposite of hot.", "Give the opposite of up."],
                               GenerationSettings(max_new_tokens=5))
    assert job["rows"] == expected
    page = http.get("/job", params={"id": job_id}).text
    assert 'id="compare-table"' in page and "Give the opposite of up." in page


def _chromium() -> str | None:
    path = os.environ.get("LORALAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return path if path and Path(path).exists() else None


@pytest.fixture(scope="module")
def server(trained):
    """``loralab ui`` in its own process on a free port."""
    command = [sys.executable, "-m", "loralab", "ui", "--runs", "runs", "--sweeps", "sweeps", "--port", "0"]
    process = subprocess.Popen(command, cwd=trained[0].parent, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    deadline = time.time() + 120
    url = None
    while time.time() < deadline and url is None and process.poll() is None:
        url = next((line.split()[2] for line in list(lines) if line.startswith("loralab ui: http://")), None)
        time.sleep(0.2)
    if url is None:
        process.kill()
        pytest.fail(f"loralab ui did not start: {''.join(lines)}")
    yield url
    process.terminate()
    process.wait(timeout=20)


def image_width(image) -> int:
    """The width of the picture an <img> shows once loaded (0: broken or not loaded within 30 s)."""
    for _ in range(300):
        if image.evaluate("img => img.complete"):
            break
        time.sleep(0.1)
    return image.evaluate("img => img.naturalWidth")


@pytest.mark.skipif(_chromium() is None, reason="needs Chromium (apt-get install chromium)")
def test_dashboard_in_a_real_browser(server, trained):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    shots = Path(os.environ["LORALAB_UI_SCREENSHOTS"]) if os.environ.get("LORALAB_UI_SCREENSHOTS") else None
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        expect = sync_api.expect

        # the run list: both trained runs, the sweep's copies, the one still training
        page.goto(server)
        table = page.locator("#runs-table")
        for name in ("r4", "r8", "live"):
            expect(table.locator(f'tr[data-run="{name}"]')).to_be_visible()
        expect(table.locator('tr[data-run="r8"] .badge')).to_have_text("finished")
        expect(table.locator('tr[data-run="live"] .badge')).to_have_text("training")
        expect(page.locator("#sweeps-table")).to_contain_text("grid")
        if shots:
            page.screenshot(path=str(shots / "ui-runs.png"), full_page=True)

        # it updates while a run trains: a new metrics line shows up without a reload
        expect(table.locator('tr[data-run="live"]')).to_contain_text("step 3")
        with (trained[0] / "live" / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps({"step": 4, "loss": 2.5}) + "\n")
        expect(table.locator('tr[data-run="live"]')).to_contain_text("step 4", timeout=15000)

        # one run: its curves (a real image), eval table, predictions, checks
        page.locator('#runs-table tr[data-run="r8"] td.name a').click()
        expect(page.locator("h1")).to_have_text("r8")
        image = page.locator("#run-curves")
        expect(image).to_be_visible()
        assert image_width(image) > 400
        expect(page.locator("#eval-table")).to_contain_text("rouge_l")
        assert page.locator("#predictions-table tbody tr").count() == 3
        expect(page.locator("#checks-table")).to_contain_text("label_masking")
        if shots:
            page.screenshot(path=str(shots / "ui-run.png"))

        # compare on one's own prompt from the page
        page.fill("#prompts", "Give the opposite of hot.")
        page.click("#compare-form button")
        expect(page.locator("#compare-table")).to_contain_text("Give the opposite of hot.", timeout=120000)
        expect(page.locator("#job-status")).to_have_text("done")

        # overlay two runs picked on the front page
        page.goto(server)
        page.check('#runs-table input[value="r4"]')
        page.check('#runs-table input[value="r8"]')
        page.click("#overlay-button")
        expect(page.locator("#overlay-table")).to_contain_text("r4")
        expect(page.locator("#config-differences")).to_contain_text("lora.r")
        assert image_width(page.locator("#overlay-curves")) > 400
        if shots:
            page.screenshot(path=str(shots / "ui-overlay.png"), full_page=True)

        # a sweep's comparison table and curves
        page.goto(f"{server}/sweep?name=grid")
        rows = page.locator("#sweep-table tbody tr")
        expect(rows).to_have_count(2)
        expect(page.locator("#sweep-table")).to_contain_text("★ best")
        assert image_width(page.locator("#sweep-curves")) > 400
        if shots:
            page.screenshot(path=str(shots / "ui-sweep.png"), full_page=True)
        browser.close()
    assert errors == []
