"""The HTTP service: a FastAPI app over one :class:`Recommender`, loaded once when the server starts.

Endpoints (the OpenAPI schema at ``/openapi.json`` and the docs at ``/docs`` are the contract):

- ``GET /health``: status and what is loaded;
- ``GET /v1/users/{user_id}/recommendations?k=10&include_seen=false``: top-k for a known user;
- ``POST /v1/recommendations`` ``{"history": [movieIds...], "k": 10}``: top-k for a new person;
- ``POST /v1/users/recommendations`` ``{"user_ids": [...], "k": 10}``: many users in one batched pass;
- ``GET /v1/items/{movie_id}``: a movie's title, year and genres.

Errors are JSON ``{"detail": "<what is wrong>"}``: 404 for an unknown user or movie, 422 for a request
that fails validation (bad k, empty or too long history, all movieIds unknown, wrong types), 413 for a
body over 1 MiB, 411 for a body without Content-Length. Requests carry only ids and numbers: nothing a
client sends names a file, and ids are looked up in in-memory tables only.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from movierec import __version__
from movierec.serving.recommender import (
    Recommendation,
    Recommender,
    RecommendError,
    UnknownItemError,
    UnknownUserError,
)

MAX_K = 1000
MAX_HISTORY = 5000
MAX_BATCH = 1000
MAX_BODY_BYTES = 1 << 20
MAX_ID = 2**63 - 1

Id = Annotated[StrictInt, Field(ge=0, le=MAX_ID)]
K = Annotated[StrictInt, Field(ge=1, le=MAX_K, description="number of recommendations (at most the item count)")]


class RecommendationOut(BaseModel):
    rank: int
    movieId: int
    title: str | None
    score: float

    @classmethod
    def of(cls, r: Recommendation) -> RecommendationOut:
        return cls(rank=r.rank, movieId=r.movie_id, title=r.title, score=r.score)


class UserRecommendations(BaseModel):
    userId: int
    recommendations: list[RecommendationOut]


class HistoryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    history: list[Id] = Field(
        min_length=1, max_length=MAX_HISTORY, description="movieIds in the order they were watched, oldest first"
    )
    k: K = 10
    include_seen: StrictBool = Field(False, description="also recommend movies of the history")


class HistoryResponse(BaseModel):
    recommendations: list[RecommendationOut]
    unknownMovieIds: list[int] = Field(description="movieIds of the history the model does not know (ignored)")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_ids: list[Id] = Field(min_length=1, max_length=MAX_BATCH, description="original MovieLens userIds")
    k: K = 10
    include_seen: StrictBool = False


class BatchResponse(BaseModel):
    results: list[UserRecommendations] = Field(description="one entry per known user, in request order")
    unknownUserIds: list[int] = Field(description="requested userIds the model does not know")


class ItemOut(BaseModel):
    movieId: int
    title: str | None
    year: int | None
    genres: str | None


class Health(BaseModel):
    status: str
    model: str
    dataset: str
    num_users: int
    num_items: int
    max_len: int
    version: str


class ErrorOut(BaseModel):
    detail: str


NOT_FOUND = {404: {"model": ErrorOut, "description": "unknown user or movie"}}
INVALID = {422: {"model": ErrorOut, "description": "the request is invalid; `detail` says why"}}


def _location(loc: tuple) -> str:
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        return ".".join(str(p) for p in loc[1:]) or str(loc[0])
    return ".".join(str(p) for p in loc) or "request"


def create_app(recommender: Recommender) -> FastAPI:
    """The app serving `recommender` (already loaded: the model is loaded once, at start)."""
    app = FastAPI(
        title="movierec",
        version=__version__,
        description="Top-k movie recommendations from a trained SSE-PT/SASRec model.",
    )
    app.state.recommender = recommender

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None:
                return JSONResponse({"detail": "a request body needs a Content-Length header"}, status_code=411)
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                return JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        messages = [f"{_location(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(messages[:10])}, status_code=422)

    @app.exception_handler(UnknownUserError)
    @app.exception_handler(UnknownItemError)
    async def not_found(_: Request, exc: RecommendError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(RecommendError)
    async def unprocessable(_: Request, exc: RecommendError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.get("/health", response_model=Health, tags=["service"])
    def health() -> Health:
        return Health(status="ok", version=__version__, **recommender.describe())

    @app.get(
        "/v1/users/{user_id}/recommendations",
        response_model=UserRecommendations,
        responses={**NOT_FOUND, **INVALID},
        tags=["recommendations"],
    )
    def user_recommendations(
        user_id: Annotated[int, Path(ge=0, le=MAX_ID, description="original MovieLens userId")],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
        include_seen: bool = False,
    ) -> UserRecommendations:
        """Top-k for a known user, scored on the user's whole history; seen movies excluded by default."""
        recs = recommender.recommend_user(user_id, k, include_seen)
        return UserRecommendations(userId=user_id, recommendations=[RecommendationOut.of(r) for r in recs])

    @app.post("/v1/recommendations", response_model=HistoryResponse, responses=INVALID, tags=["recommendations"])
    def history_recommendations(request: HistoryRequest) -> HistoryResponse:
        """Top-k for a new person from the movies they watched; unknown movieIds are reported and ignored."""
        result = recommender.recommend_history(request.history, request.k, request.include_seen)
        return HistoryResponse(
            recommendations=[RecommendationOut.of(r) for r in result.recommendations],
            unknownMovieIds=result.unknown_movie_ids,
        )

    @app.post(
        "/v1/users/recommendations",
        response_model=BatchResponse,
        responses={**NOT_FOUND, **INVALID},
        tags=["recommendations"],
    )
    def batch_recommendations(request: BatchRequest) -> BatchResponse:
        """Top-k for many known users in one batched pass; unknown users are listed (404 if none is known)."""
        wanted = list(dict.fromkeys(request.user_ids))
        known = [u for u in wanted if recommender.has_user(u)]
        unknown = [u for u in wanted if not recommender.has_user(u)]
        if not known:
            raise UnknownUserError(f"none of the requested users is known to this model ({len(unknown)} unknown)")
        recs = recommender.recommend_users(known, request.k, request.include_seen)
        return BatchResponse(
            results=[
                UserRecommendations(userId=u, recommendations=[RecommendationOut.of(r) for r in recs[u]]) for u in known
            ],
            unknownUserIds=unknown,
        )

    @app.get("/v1/items/{movie_id}", response_model=ItemOut, responses=NOT_FOUND, tags=["items"])
    def item(movie_id: Annotated[int, Path(ge=0, le=MAX_ID, description="original MovieLens movieId")]) -> ItemOut:
        found = recommender.item(movie_id)
        return ItemOut(movieId=found.movie_id, title=found.title, year=found.year, genres=found.genres)

    return app
