"""The web page: one self-contained HTML file (inline CSS and JS, nothing fetched elsewhere)."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["web"])


@cache
def _page() -> str:
    return (
        resources.files("image_classifier.gateway")
        .joinpath("static/index.html")
        .read_text(encoding="utf-8")
    )


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    # The page calls only this origin; the CSP keeps it that way even if markup is injected.
    return HTMLResponse(
        _page(),
        headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
            "style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'",
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        },
    )
