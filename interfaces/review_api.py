"""The review view of ``bucketchat serve`` (the page at ``/review``, retrieval/review.py behind it):

- ``GET /v1/review?max_groups=N``: the groups of undecided turns, biggest first, with suggestions;
- ``POST /v1/review`` ``{"group": KEY, "decision": "existing" | "new" | "out_of_scope",
  "response": TEXT, "reviewer": NAME}``: one group's decision, written as a drop into the
  server's ``--drop_dir`` at once (so the nightly retrain learns it), its turns marked decided.

Stateless between requests, so it works with ``--workers``: a group is named by a hash of its turns;
a decision on a group that has changed since it was listed (new turns joined it) is refused (409).
"""

from __future__ import annotations

import asyncio
import getpass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from interfaces.api_error import ApiError

REVIEW_PAGE = Path(__file__).with_name("static") / "review.html"


def review_routes(engine, cfg, check_auth, read_json, pool) -> list[Route]:
    from retrieval.review import DECISIONS, Decision, pending_groups, suggestions, write_decisions

    def folder():
        if engine.turn_log is None:
            raise ApiError(
                409, "this server keeps no conversation log (started with --no_log), so there is nothing to review", code="no_log"
            )
        engine.turn_log.flush()  # the turns of the last second too
        return engine.turn_log.folder

    def listing(limit: int) -> list[dict]:
        groups = pending_groups(engine, folder(), cfg.review_below, cfg.review_similarity)
        return [g.to_dict(suggestions(engine, g)) for g in groups[:limit]], len(groups)

    def decide(body: dict) -> dict:
        kind, key = body.get("decision"), body.get("group")
        if kind not in DECISIONS:
            raise ApiError(400, f"decision must be one of {', '.join(DECISIONS)}", "decision")
        if not isinstance(key, str):
            raise ApiError(400, "group must be the key GET /v1/review gave the group", "group")
        reviewer = body.get("reviewer")
        reviewer = reviewer.strip()[:100] if isinstance(reviewer, str) and reviewer.strip() else f"web:{getpass.getuser()}"
        log = folder()
        found = [g for g in pending_groups(engine, log, cfg.review_below, cfg.review_similarity) if g.key == key]
        if not found:
            raise ApiError(409, "that group has changed or was decided since it was listed; reload the review", "group", code="stale_group")
        try:
            decision = Decision(found[0], kind, body.get("response"))
        except ValueError as exc:
            raise ApiError(400, str(exc), "response") from None
        drop = write_decisions([decision], cfg.drop_dir, log, reviewer)
        return {"ok": True, "drop": str(drop), "turns": len(found[0].turns), "records": len(found[0].messages)}

    async def list_groups(request: Request) -> Response:
        check_auth(request)
        raw = request.query_params.get("max_groups", "20")
        if not raw.isdigit() or int(raw) < 1:
            raise ApiError(400, f"max_groups must be a number of groups (1 or more), got {raw!r}", "max_groups")
        groups, total = await asyncio.get_running_loop().run_in_executor(pool, listing, int(raw))
        return JSONResponse({"groups": groups, "total": total, "drop_dir": str(cfg.drop_dir)})

    async def post_decision(request: Request) -> Response:
        check_auth(request)
        body = await read_json(request)
        if not isinstance(body, dict):
            raise ApiError(400, 'the body must be a JSON object: {"group": "...", "decision": "new", "response": "..."}')
        return JSONResponse(await asyncio.get_running_loop().run_in_executor(pool, decide, body))

    async def page(request: Request) -> Response:
        return FileResponse(REVIEW_PAGE, media_type="text/html")

    return [
        Route("/review", page, methods=["GET"]),
        Route("/v1/review", list_groups, methods=["GET"]),
        Route("/v1/review", post_decision, methods=["POST"]),
    ]
