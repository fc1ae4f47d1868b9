"""ComfyUI's jobs API (`GET /api/jobs`, `GET /api/jobs/{id}`) as newer releases
answer it: one shape for a prompt wherever it is (queued, running, in
history). Written from reading ComfyUI's server.py and comfy_execution/jobs.py
(0.15.0); there is no recording of it, since the recorded 0.3.64 has no such
route. The simulator serves it only with `SimulatorOptions.jobs_api`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

JsonDict = dict[str, Any]
PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = (
    "pending",
    "in_progress",
    "completed",
    "failed",
    "cancelled",
)
STATUSES = (PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)
SORT_FIELDS = ("created_at", "execution_duration")
PREVIEWABLE = ("images", "video", "audio", "3d")
END_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


class BadQuery(ValueError):
    """A list query ComfyUI answers 400 {"error": message}."""


def queued_job(item: list[Any], status: str) -> JsonDict:
    """A job still in the queue: `item` is the queue entry [number, id, graph, extra, outputs]."""
    number, prompt_id, _, extra_data, _ = item
    return _pruned(
        id=prompt_id,
        status=status,
        priority=number,
        create_time=extra_data.get("create_time"),
        outputs_count=0,
        workflow_id=_workflow_id(extra_data),
    )


def history_job(prompt_id: str, entry: Mapping[str, Any], *, detail: bool = False) -> JsonDict:
    """A job from its history entry; `detail` (the single-job route) adds the
    outputs, the execution status as history has it, and the workflow."""
    number, _, graph, extra_data, _ = entry["prompt"]
    status_info = entry.get("status") or {}
    outputs = entry.get("outputs") or {}
    count, preview = _outputs_summary(outputs)
    ends = _execution_times(status_info)
    job = _pruned(
        id=prompt_id,
        status=_history_status(status_info),
        priority=number,
        create_time=extra_data.get("create_time"),
        execution_start_time=ends.get("execution_start"),
        execution_end_time=ends.get("end"),
        execution_error=ends.get("error"),
        outputs_count=count,
        preview_output=preview,
        workflow_id=_workflow_id(extra_data),
    )
    if detail:
        job["outputs"] = outputs
        job["execution_status"] = status_info
        job["workflow"] = {"prompt": graph, "extra_data": extra_data}
    return job


def find_job(
    prompt_id: str,
    running: Iterable[list[Any]],
    pending: Iterable[list[Any]],
    history: Mapping[str, JsonDict],
) -> JsonDict | None:
    """The single-job answer: history first, then the running and waiting prompts."""
    if prompt_id in history:
        return history_job(prompt_id, history[prompt_id], detail=True)
    for items, status in ((running, IN_PROGRESS), (pending, PENDING)):
        for item in items:
            if item[1] == prompt_id:
                return queued_job(item, status)
    return None


def list_jobs(
    query: Mapping[str, str],
    running: Iterable[list[Any]],
    pending: Iterable[list[Any]],
    history: Mapping[str, JsonDict],
) -> JsonDict:
    """The list answer, filtered, sorted and paged as `query` asks; BadQuery when
    a parameter is one ComfyUI refuses."""
    wanted, sort_by, descending, limit, offset = _parse(query)
    jobs = [queued_job(i, IN_PROGRESS) for i in running if IN_PROGRESS in wanted]
    jobs += [queued_job(i, PENDING) for i in pending if PENDING in wanted]
    jobs += [j for j in (history_job(k, v) for k, v in history.items()) if j["status"] in wanted]
    if query.get("workflow_id"):
        jobs = [j for j in jobs if j.get("workflow_id") == query["workflow_id"]]
    jobs.sort(key=_duration if sort_by == "execution_duration" else _created, reverse=descending)
    total = len(jobs)
    page = jobs[offset:][:limit] if limit is not None else jobs[offset:]
    return {
        "jobs": page,
        "pagination": {
            "offset": offset,
            "limit": limit,
            "total": total,
            "has_more": offset + len(page) < total,
        },
    }


def _parse(query: Mapping[str, str]) -> tuple[set[str], str, bool, int | None, int]:
    wanted = set(STATUSES)
    if query.get("status"):
        wanted = {s.strip().lower() for s in query["status"].split(",") if s.strip()}
        invalid = sorted(wanted - set(STATUSES))
        if invalid:
            raise BadQuery(
                f"Invalid status value(s): {', '.join(invalid)}. "
                f"Valid values: {', '.join(STATUSES)}"
            )
    sort_by = query.get("sort_by", "created_at").lower()
    if sort_by not in SORT_FIELDS:
        raise BadQuery("sort_by must be 'created_at' or 'execution_duration'")
    sort_order = query.get("sort_order", "desc").lower()
    if sort_order not in ("asc", "desc"):
        raise BadQuery("sort_order must be 'asc' or 'desc'")
    return wanted, sort_by, sort_order == "desc", _limit(query), _offset(query)


def _limit(query: Mapping[str, str]) -> int | None:
    if "limit" not in query:
        return None
    try:
        limit = int(query["limit"])
    except ValueError:
        raise BadQuery("limit must be an integer") from None
    if limit <= 0:
        raise BadQuery("limit must be a positive integer")
    return limit


def _offset(query: Mapping[str, str]) -> int:
    try:
        return max(0, int(query.get("offset", "0")))
    except ValueError:
        raise BadQuery("offset must be an integer") from None


def _history_status(status_info: Mapping[str, Any]) -> str:
    if status_info.get("status_str") != "error":
        return COMPLETED  # success, or an entry written before statuses existed
    interrupted = any(m[0] == "execution_interrupted" for m in _messages(status_info))
    return CANCELLED if interrupted else FAILED


def _execution_times(status_info: Mapping[str, Any]) -> JsonDict:
    found: JsonDict = {}
    for event, data in _messages(status_info):
        if event == "execution_start":
            found["execution_start"] = data.get("timestamp")
        elif event in END_EVENTS:
            found["end"] = data.get("timestamp")
            if event == "execution_error":
                found["error"] = data
    return found


def _messages(status_info: Mapping[str, Any]) -> list[tuple[str, JsonDict]]:
    return [
        (str(m[0]), m[1])
        for m in status_info.get("messages", [])
        if isinstance(m, list | tuple) and len(m) >= 2 and isinstance(m[1], dict)
    ]


def _outputs_summary(outputs: Mapping[str, Any]) -> tuple[int, JsonDict | None]:
    """(number of output files, the one to preview: a saved one before a temporary one)."""
    count, saved, other = 0, None, None
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            continue
        for media_type, items in node_outputs.items():
            if media_type == "animated" or not isinstance(items, list):
                continue
            for item in (i for i in items if isinstance(i, dict)):
                count += 1
                if media_type in PREVIEWABLE:
                    preview = {**item, "nodeId": node_id, "mediaType": media_type}
                    if item.get("type") == "output":
                        saved = saved or preview
                    else:
                        other = other or preview
    return count, saved or other


def _workflow_id(extra_data: Mapping[str, Any]) -> Any:
    return (extra_data.get("extra_pnginfo") or {}).get("workflow", {}).get("id")


def _created(job: JsonDict) -> Any:
    return job.get("create_time", 0)


def _duration(job: JsonDict) -> Any:
    start, end = job.get("execution_start_time", 0), job.get("execution_end_time", 0)
    return end - start if start and end else 0


def _pruned(**fields: Any) -> JsonDict:
    """ComfyUI leaves out the fields it has no value for."""
    return {key: value for key, value in fields.items() if value is not None}
