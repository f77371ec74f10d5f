"""The dashboard's web app (FastAPI): pages, live partials, PNG curves, JSON, and compare jobs.

Every value from a run folder reaches the page through Jinja2 with autoescaping, and the Content-Security-Policy
allows only the app's own script file, so nothing a run folder holds can run in the browser.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2
from fastapi import FastAPI, Form, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from loralab.errors import LoralabError
from loralab.metrics import HIGHER_IS_BETTER
from loralab.ui import views
from loralab.ui.catalog import Catalog
from loralab.ui.curves import curves_png
from loralab.ui.jobs import MAX_NEW_TOKENS, MAX_PROMPTS, CompareJobs, parse_prompts
from loralab.ui.scan import GENERATION_KEYS, RunView
from loralab.ui.sweep_folders import REPORT_FILES

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
REPORT_CSP = "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'"  # a sweep's report.html: no script
POLL_MS = 3000


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(show=views.display, ago=views.ago, css=lambda s: "".join(c if c.isalnum() else "-" for c in str(s)))
    env.globals.update(GENERATION_KEYS=GENERATION_KEYS, POLL_MS=POLL_MS, MAX_PROMPTS=MAX_PROMPTS,
                       MAX_NEW_TOKENS=MAX_NEW_TOKENS)
    return env


def _host_name(header: str) -> str:
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _same_origin(request: Request) -> bool:
    """Whether a POST comes from the dashboard's own pages (browsers say so in Sec-Fetch-Site, older ones in Origin)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host")


def create_app(runs_dir: str | Path = "runs", sweeps_dir: str | Path = "sweeps",
               allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS) -> FastAPI:
    """The dashboard over ``runs_dir`` and ``sweeps_dir``. ``allowed_hosts``: the Host names a request may use
    (loopback by default, which also stops DNS-rebinding pages; None: any, for ``--allow-remote``)."""
    catalog = Catalog(Path(runs_dir), Path(sweeps_dir))
    jobs = CompareJobs()
    templates = Jinja2Templates(env=environment())
    app = FastAPI(title="loralab ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.catalog, app.state.jobs = catalog, jobs
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("catalog", catalog)
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    def message(request: Request, title: str, text: str, status_code: int) -> HTMLResponse:
        return page(request, "message.html", status_code, title=title, text=text)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        host = _host_name(request.headers.get("host", ""))
        if allowed_hosts is not None and host not in allowed_hosts:
            return PlainTextResponse(f"loralab ui answers only requests for {', '.join(sorted(allowed_hosts))}; "
                                     f"this one named the host {host!r}", status_code=421)
        if request.method not in ("GET", "HEAD") and not _same_origin(request):
            return PlainTextResponse("refused: a form of another site posted to loralab ui", status_code=403)
        try:
            response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 - one bad folder must never take the dashboard down
            log.exception("loralab ui: %s failed", request.url.path)
            response = PlainTextResponse(f"loralab ui could not build this page: {type(exc).__name__}: {exc}", 500)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    def find_run(request: Request, run_id: str) -> RunView | HTMLResponse:
        run = catalog.run(run_id)
        if run is None:
            return message(request, "No such run", f"No run {run_id!r} in {catalog.runs_dir} or {catalog.sweeps_dir}. "
                           "It may have been moved or deleted.", 404)
        return run

    # ---------------------------------------------------------------- front page

    def index_context() -> dict[str, Any]:
        runs, sweeps = catalog.runs(), catalog.sweeps()
        return {"runs": runs + [r for s in sweeps for r in s.runs], "sweeps": sweeps, "notes": catalog.notes()}

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request) -> HTMLResponse:
        return page(request, "index.html", **index_context())

    @app.get("/live/index", response_class=HTMLResponse)
    def index_live(request: Request) -> HTMLResponse:
        return page(request, "_index_live.html", **index_context())

    # ---------------------------------------------------------------- one run

    def run_context(run: RunView) -> dict[str, Any]:
        return {"run": run, "facts": views.facts(run), "eval_rows": views.eval_table(run), "checks": views.checks_rows(run),
                "running_job": jobs.running()}

    @app.get("/run", response_class=HTMLResponse)
    def run_page(request: Request, id: str = "", q: str = "", show: str = "all", page_no: str = Query("1", alias="page")):
        run = find_run(request, id)
        if isinstance(run, HTMLResponse):
            return run
        number = int(page_no) if page_no.isdigit() else 1
        return page(request, "run.html", **run_context(run), predictions=views.predictions(run, q, show, number))

    @app.get("/live/run", response_class=HTMLResponse)
    def run_live(request: Request, id: str = ""):
        run = find_run(request, id)
        if isinstance(run, HTMLResponse):
            return run
        return page(request, "_run_live.html", **run_context(run))

    @app.get("/curves.png")
    def curves(request: Request, run: list[str] = Query(default=[]), sweep: str = "") -> Response:
        if sweep:
            found = catalog.sweep(sweep)
            selected = found.runs if found else []
            title = f"sweep {sweep}"
        else:
            selected = [r for r in (catalog.run(i) for i in run[:20]) if r is not None]
            title = selected[0].id if len(selected) == 1 else ""
        if not selected:
            return PlainTextResponse("no such run or sweep", status_code=404)
        return Response(curves_png(selected, title), media_type="image/png")

    @app.get("/overlay", response_class=HTMLResponse)
    def overlay(request: Request, run: list[str] = Query(default=[])):
        selected = [r for r in (catalog.run(i) for i in run[:20]) if r is not None]
        missing = [i for i in run if catalog.run_path(i) is None and catalog.run(i) is None]
        return page(request, "overlay.html", runs=selected, missing=missing, ids=[r.id for r in selected],
                    differences=views.config_differences(selected))

    # ---------------------------------------------------------------- sweeps

    def sweep_context(name: str) -> dict[str, Any] | None:
        sweep = catalog.sweep(name)
        if sweep is None:
            return None
        keys, rows = views.sweep_table(sweep)
        return {"sweep": sweep, "keys": keys, "rows": rows, "best": sweep.best,
                "higher": HIGHER_IS_BETTER[sweep.metric]}

    @app.get("/sweep", response_class=HTMLResponse)
    def sweep_page(request: Request, name: str = ""):
        context = sweep_context(name)
        if context is None:
            return message(request, "No such sweep", f"No sweep {name!r} in {catalog.sweeps_dir} (a folder with a "
                           "sweep.yaml).", 404)
        prompts, columns = context["sweep"].answers()
        return page(request, "sweep.html", **context, prompts=prompts, columns=columns)

    @app.get("/live/sweep", response_class=HTMLResponse)
    def sweep_live(request: Request, name: str = ""):
        context = sweep_context(name)
        if context is None:
            return message(request, "No such sweep", f"No sweep {name!r}", 404)
        return page(request, "_sweep_live.html", **context)

    @app.get("/sweep/file")
    def sweep_file(name: str = "", file: str = "") -> Response:
        sweep = catalog.sweep(name)
        if sweep is None or file not in REPORT_FILES or not (sweep.path / file).is_file():
            return PlainTextResponse("no such report file", status_code=404)
        path = sweep.path / file
        if file == "curves.png":
            return FileResponse(path, media_type="image/png")
        if file == "report.html":  # shown as written, scripts disabled by the sandbox
            return FileResponse(path, media_type="text/html", headers={"Content-Security-Policy": REPORT_CSP})
        return FileResponse(path, media_type="text/plain; charset=utf-8")

    # ---------------------------------------------------------------- compare from the page

    @app.post("/compare")
    def compare(request: Request, id: str = Form(...), prompts: str = Form(""), checkpoint: str = Form("best"),
                max_new_tokens: str = Form("64")):
        from loralab.runs import resolve_adapter

        run = find_run(request, id)
        if isinstance(run, HTMLResponse):
            return run
        try:
            if not max_new_tokens.strip().isdigit():
                raise LoralabError(f"max new tokens must be a whole number, got {max_new_tokens!r}")
            resolve_adapter(run.path, checkpoint)  # a clear refusal now, before any model loads
            job = jobs.start(run.id, run.path, parse_prompts(prompts), checkpoint, int(max_new_tokens))
        except LoralabError as exc:
            return message(request, "Cannot compare", str(exc), 409 if "running" in str(exc) else 400)
        return RedirectResponse(f"/job?id={job.id}", status_code=303)

    @app.get("/job", response_class=HTMLResponse)
    def job_page(request: Request, id: str = ""):
        job = jobs.get(id)
        if job is None:
            return message(request, "No such comparison", "This comparison is not known (the server was restarted, "
                           "or it is one of many older ones).", 404)
        return page(request, "job.html", job=job)

    # ---------------------------------------------------------------- JSON

    @app.get("/api/runs")
    def api_runs() -> JSONResponse:
        context = index_context()
        return JSONResponse({"runs": [views.run_row(r) for r in context["runs"]], "notes": context["notes"],
                             "sweeps": [{"name": s.name, "runs": len(s.runs), "counts": s.counts(), "metric": s.metric,
                                         "best": s.best.id if s.best else None, "notes": s.notes} for s in context["sweeps"]]})

    @app.get("/api/run")
    def api_run(id: str = "") -> JSONResponse:
        run = catalog.run(id)
        if run is None:
            return JSONResponse({"error": f"no run {id!r}"}, status_code=404)
        return JSONResponse({**views.run_row(run), "summary": run.summary, "evaluation": run.evaluation,
                             "metrics": run.metrics, "checks": run.checks})

    @app.get("/api/job")
    def api_job(id: str = "") -> JSONResponse:
        job = jobs.get(id)
        return JSONResponse(job.to_dict() if job else {"error": f"no job {id!r}"}, status_code=200 if job else 404)

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> Response:
        return message(request, "Not found", f"Nothing at {request.url.path}.", 404)

    return app
