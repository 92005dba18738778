"""Live job progress in a browser: FastAPI, one AsyncJobClient, Server-Sent Events.

With a worker going (celery -A tasks worker), from the repository root:

    uvicorn examples.fastapi_progress:app          # then open http://127.0.0.1:8000/

POST /jobs {"workflow": ..., "params": {...}}  -> {"job_id": ...}
GET  /jobs/{id}/events                          -> text/event-stream: status, progress, then result

Run one process (no --workers N): a job's updates go to the process that submitted it, and a
job this process does not know is connected to first (it then gets everything that waited).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel

from ebb import JobQueuesExpiredError, JobResult, ProgressUpdate, StatusUpdate, UnavailableError
from ebb.aio import AsyncJobClient
from ebb.contract import encode_message, message_type


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with AsyncJobClient() as client:  # one connection for the whole app
        app.state.client = client
        app.state.jobs = set()  # ids whose events this process receives and has not streamed yet
        yield


app = FastAPI(title="Ebb progress", lifespan=lifespan)


class JobRequest(BaseModel):
    workflow: str
    params: dict[str, Any] = {}


@app.post("/jobs")
async def submit(body: JobRequest, request: Request) -> dict[str, str]:
    client: AsyncJobClient = request.app.state.client
    try:
        job = await client.submit_job(body.workflow, body.params, updates=True)
    except ValueError as exc:  # InvalidArgumentError, UnknownWorkflowError
        raise HTTPException(422, str(exc)) from None
    except UnavailableError as exc:
        raise HTTPException(503, str(exc)) from None
    request.app.state.jobs.add(job.id)
    return {"job_id": str(job.id)}


def sse(event: StatusUpdate | ProgressUpdate | JobResult) -> str:
    """One Server-Sent Event: ``event: status|progress|result`` and the message as JSON."""
    return f"event: {message_type(event)}\ndata: {encode_message(event).decode()}\n\n"


@app.get("/jobs/{job_id}/events")
async def events(job_id: uuid.UUID, request: Request) -> StreamingResponse:
    client: AsyncJobClient = request.app.state.client
    jobs: set[uuid.UUID] = request.app.state.jobs
    if job_id not in jobs:  # submitted elsewhere (or by an earlier run): take it over
        try:
            await client.connect_to_submitted_job(str(job_id))
        except JobQueuesExpiredError as exc:  # gone, or its result was already delivered
            raise HTTPException(404, str(exc)) from None
        except UnavailableError as exc:
            raise HTTPException(503, str(exc)) from None
        jobs.add(job_id)

    async def stream() -> AsyncIterator[str]:
        async for event in client.events(job_id):  # what waited first, then live, result last
            yield sse(event)
        await client.wait(job_id)  # until the job's queues are deleted too
        jobs.discard(job_id)  # a browser that left early resumes above; after the result: 404

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Ebb progress</title>
<style>body{font:16px sans-serif;margin:2em} progress{width:24em;height:1.5em}</style></head>
<body>
<h1>Ebb: demo.sleep</h1>
<form id="form">
  <label>seconds <input name="seconds" type="number" value="3" min="0" step="any"></label>
  <label>steps <input name="steps" type="number" value="6" min="1"></label>
  <button>Run</button>
</form>
<p><progress id="bar" value="0" max="1"></progress> <span id="percent">0 %</span></p>
<p>Status: <span id="status">-</span> <span id="message"></span></p>
<p>Result: <code id="result">-</code></p>
<script>
const $ = (id) => document.getElementById(id);

async function run(workflow, params) {
  $("bar").value = 0; $("percent").textContent = "0 %"; $("result").textContent = "-";
  $("status").textContent = "SUBMITTING";
  const response = await fetch("/jobs", {
    method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({workflow, params}),
  });
  const body = await response.json();
  if (!response.ok) { $("status").textContent = "REFUSED: " + body.detail; return; }
  $("status").textContent = "SUBMITTED";
  const source = new EventSource(`/jobs/${body.job_id}/events`);
  source.addEventListener("status", (e) => { $("status").textContent = JSON.parse(e.data).status; });
  source.addEventListener("progress", (e) => {
    const p = JSON.parse(e.data);
    $("bar").value = p.progress;
    $("percent").textContent = Math.round(p.progress * 100) + " %";
    $("message").textContent = p.message;
  });
  source.addEventListener("result", (e) => {
    source.close();  // done: no reconnect
    const r = JSON.parse(e.data);
    $("status").textContent = r.status;
    $("result").textContent = r.status + " " + JSON.stringify(r.error ? r.error.message : r.output);
  });
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const form = new FormData(e.target);
  run("demo.sleep", {seconds: Number(form.get("seconds")), steps: Number(form.get("steps"))});
});

// /?autostart=demo.sleep&seconds=1&steps=4 starts a job on load (headless browsers, tests).
const query = new URLSearchParams(location.search);
if (query.has("autostart")) {
  const form = $("form");
  form.seconds.value = query.get("seconds") || 1; form.steps.value = query.get("steps") || 1;
  run(query.get("autostart"), {seconds: Number(form.seconds.value), steps: Number(form.steps.value)});
}
</script>
</body></html>
"""


@app.get("/", response_class=HTMLResponse)
async def page() -> str:
    return PAGE
