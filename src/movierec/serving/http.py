"""The HTTP service: a FastAPI app over one :class:`Recommender`, loaded once when the server starts.

Endpoints (the OpenAPI schema at ``/openapi.json`` and the docs at ``/docs`` are the contract):

- ``GET /health``: status and what is loaded;
- ``GET /v1/users/{user_id}/recommendations?k=10&include_seen=false``: top-k for a known user;
- ``POST /v1/recommendations`` ``{"history": [movieIds...], "k": 10}``: top-k for a new person;
- ``POST /v1/users/recommendations`` ``{"user_ids": [...], "k": 10}``: many users in one batched pass;
- ``GET /v1/items/{movie_id}``: a movie's title, year and genres;
- ``GET /v1/items?query=toy 1995&limit=10``: title search (case, accents and punctuation ignored, year included);
- ``GET /v1/users/{user_id}/history?limit=5000``: a known user's movies, oldest first;
- ``GET /v1/genres``: the genres of the catalogue;
- ``POST /v1/recommendations/explained`` ``{"history": [...], "k": 10, "genre": "Comedy"}``: top-k of a genre
  (or all), each with the history movie that contributed most to it;
- ``GET /``: a page to try the recommender (``serving/page/``, every asset bundled; not part of the API).

Every error is JSON ``{"detail": "<what is wrong>"}`` (the ``ErrorOut`` schema, declared in the OpenAPI
document for every status each route can answer): 404 for an unknown user or movie; 422 for a request
that fails validation (bad k, empty or too long history, all movieIds unknown, wrong types, a body that
is not UTF-8 JSON); and, from :class:`~movierec.serving.limits.RequestLimits` before the app runs, 400
for ambiguous framing (``Transfer-Encoding`` with ``Content-Length``), 411 for a body without
``Content-Length``, 413 for a body over 1 MiB (counted as it arrives), 431 for over 16 KiB of request line
and headers, 408 for a body that stalls and 503 when too many requests are in progress. Requests carry only
ids, numbers and short texts (a search query, a genre): nothing a client sends names a file, and everything
is looked up in in-memory tables only.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Annotated

from fastapi import FastAPI, Path, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from movierec import __version__
from movierec.serving.limits import MAX_HEADER_BYTES, RequestLimits, check_limits
from movierec.serving.recommender import (
    ExplainedRecommendation,
    Item,
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
BODY_TIMEOUT = 10.0  # seconds a request body may go without a byte arriving
BODY_DEADLINE = 60.0  # seconds a whole request body may take
MAX_CONCURRENT_REQUESTS = 128  # requests being served (body read) before 503s
MAX_CONCURRENT_UPLOADS = 128  # request bodies being received before 503s, a budget of its own
MAX_QUERY = 200  # characters of a title search
MAX_SEARCH_RESULTS = 100
MAX_GENRE = 100  # characters of a genre name

# the page at `/`: its files, bundled in the package, by the name they are requested by; nothing else is served
PAGE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# the page loads nothing from elsewhere (no CDN): the browser is told to refuse anything that is not ours
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

Id = Annotated[StrictInt, Field(ge=0, le=MAX_ID)]
SearchQuery = Annotated[
    str,
    Query(
        min_length=1,
        max_length=MAX_QUERY,
        description="words of the title or its year, any case or accents, in any order: `toy 1995`, `amelie`",
    ),
]
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

    @classmethod
    def of(cls, item: Item) -> ItemOut:
        return cls(movieId=item.movie_id, title=item.title, year=item.year, genres=item.genres)


class ItemsOut(BaseModel):
    items: list[ItemOut] = Field(description="the best matches first")


class UserHistoryOut(BaseModel):
    userId: int
    items: list[ItemOut] = Field(description="the user's movies, oldest first (the last `limit` of them)")


class GenresOut(BaseModel):
    genres: list[str] = Field(description="every genre of the catalogue, sorted")


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    history: list[Id] = Field(
        min_length=1, max_length=MAX_HISTORY, description="movieIds in the order they were watched, oldest first"
    )
    k: K = 10
    genre: Annotated[StrictStr, Field(min_length=1, max_length=MAX_GENRE)] | None = Field(
        None, description="only movies of this genre (one of GET /v1/genres); all genres when absent"
    )


class BecauseOut(BaseModel):
    movieId: int
    title: str | None
    scoreDrop: float | None = Field(
        description="how much the recommendation's score falls when this movie is left out of the history (the "
        "largest fall of any history movie); null when the history holds no other movie"
    )


class ExplainedOut(BaseModel):
    rank: int
    movieId: int
    title: str | None
    year: int | None
    genres: str | None
    score: float
    because: BecauseOut = Field(description="the history movie that contributed most to this recommendation")

    @classmethod
    def of(cls, explained: ExplainedRecommendation) -> ExplainedOut:
        r, item, why = explained.recommendation, explained.item, explained.because
        because = BecauseOut(movieId=why.movie_id, title=why.title, scoreDrop=why.score_drop)
        return cls(
            rank=r.rank,
            movieId=r.movie_id,
            title=r.title,
            year=item.year,
            genres=item.genres,
            score=r.score,
            because=because,
        )


class ExplainedResponse(BaseModel):
    recommendations: list[ExplainedOut]
    unknownMovieIds: list[int] = Field(description="movieIds of the history the model does not know (ignored)")


class Health(BaseModel):
    status: str
    model: str
    dataset: str
    num_users: int
    num_items: int
    max_len: int
    version: str


class ErrorOut(BaseModel):
    """The body of every error response (4xx and 503)."""

    detail: str = Field(description="what is wrong, in one line")


def _location(loc: tuple) -> str:
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        return ".".join(str(p) for p in loc[1:]) or str(loc[0])
    return ".".join(str(p) for p in loc) or "request"


def _message(error: dict) -> str:
    if error.get("type") == "json_invalid":
        position = error.get("loc", ("body", "?"))[-1]
        reason = (error.get("ctx") or {}).get("error", "invalid JSON")
        return f"body: JSON decode error at character {position}: {reason}"
    return f"{_location(error.get('loc', ()))}: {error.get('msg', 'invalid')}"


def _unparsable(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "the body is not UTF-8"
    if isinstance(exc, RecursionError):
        return "the JSON is nested too deeply"
    return type(exc).__name__


def create_app(
    recommender: Recommender,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    body_timeout: float = BODY_TIMEOUT,
    body_deadline: float = BODY_DEADLINE,
    max_concurrent_requests: int = MAX_CONCURRENT_REQUESTS,
    max_concurrent_uploads: int = MAX_CONCURRENT_UPLOADS,
    batch_window_ms: float | None = 2.0,
    max_batch: int = 64,
) -> FastAPI:
    """The app serving `recommender` (already loaded: the model is loaded once, at start).

    The limits (see :mod:`movierec.serving.limits`) apply to every request, whatever server runs the app:
    a body over `max_body_bytes` (counted as it arrives) gets 413, a body with no bytes for `body_timeout`
    seconds or not complete after `body_deadline` seconds gets 408, and a request arriving while
    `max_concurrent_requests` are being served, or with a body while `max_concurrent_uploads` bodies are being
    received, gets 503 (`/health` is never refused).
    """
    check_limits(max_body_bytes, body_timeout, body_deadline, max_concurrent_requests, max_concurrent_uploads)
    if batch_window_ms is not None:  # concurrent requests scored together (serving/batching.py); None: one by one
        if not (0 <= batch_window_ms <= 1000 and max_batch >= 1):
            raise ValueError(f"batching needs 0 <= batch_window_ms <= 1000 and max_batch >= 1, got {batch_window_ms}, "
                             f"{max_batch}")  # fmt: skip
        recommender.enable_batching(batch_window_ms / 1000, max_batch)
    app = FastAPI(
        title="movierec",
        version=__version__,
        description="Top-k movie recommendations from a trained SSE-PT/SASRec model. Every error response is "
        '`{"detail": "<what is wrong>"}`.',
    )
    app.state.recommender = recommender
    app.add_middleware(
        RequestLimits,
        max_body_bytes=max_body_bytes,
        body_timeout=body_timeout,
        body_deadline=body_deadline,
        max_concurrent=max_concurrent_requests,
        max_uploads=max_concurrent_uploads,
    )

    described = {
        400: "ambiguous framing: both Transfer-Encoding and Content-Length, or a bad Content-Length",
        404: "unknown user or movie",
        408: f"the request body stalled ({body_timeout:g} s without a byte) or took over {body_deadline:g} s",
        411: "a request body without Content-Length",
        413: f"a request body over {max_body_bytes} bytes",
        422: "the request is invalid (a parameter, the JSON body or its encoding); `detail` says why",
        431: f"the request line and headers over {MAX_HEADER_BYTES} bytes",
        503: f"{max_concurrent_requests} requests already in progress, or {max_concurrent_uploads} request bodies "
        "being received; retry later (see Retry-After)",
    }

    def errors(*statuses: int, exempt: bool = False) -> dict:
        """The OpenAPI `responses` of a route: the statuses every route can answer, and `statuses`; a route
        exempt from the request budgets (`/health`) is never refused with 503, nor reads a body (408)."""
        every = {400, 413, 431, *statuses} | (set() if exempt else {408, 503})
        return {s: {"model": ErrorOut, "description": described[s]} for s in sorted(every)}

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        messages = [_message(e) for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(messages[:10])}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # FastAPI answers 400 (undeclared) for a JSON body it cannot decode other than by a JSONDecodeError
        # (not UTF-8, nested past the recursion limit); the body is invalid JSON like any other: 422
        if exc.status_code == 400 and exc.__cause__ is not None:
            detail = f"body: JSON decode error: {_unparsable(exc.__cause__)}"
            return JSONResponse({"detail": detail}, status_code=422)
        return await http_exception_handler(request, exc)

    @app.exception_handler(UnknownUserError)
    @app.exception_handler(UnknownItemError)
    async def not_found(_: Request, exc: RecommendError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(RecommendError)
    async def unprocessable(_: Request, exc: RecommendError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.get("/health", response_model=Health, responses=errors(exempt=True), tags=["service"])
    def health() -> Health:
        return Health(status="ok", version=__version__, **recommender.describe())

    @app.get(
        "/v1/users/{user_id}/recommendations",
        response_model=UserRecommendations,
        responses=errors(404, 422),
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

    @app.post(
        "/v1/recommendations", response_model=HistoryResponse, responses=errors(411, 422), tags=["recommendations"]
    )
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
        responses=errors(404, 411, 422),
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

    @app.get("/v1/items/{movie_id}", response_model=ItemOut, responses=errors(404, 422), tags=["items"])
    def item(movie_id: Annotated[int, Path(ge=0, le=MAX_ID, description="original MovieLens movieId")]) -> ItemOut:
        return ItemOut.of(recommender.item(movie_id))

    @app.get("/v1/items", response_model=ItemsOut, responses=errors(422), tags=["items"])
    def search_items(
        query: SearchQuery,
        limit: Annotated[int, Query(ge=1, le=MAX_SEARCH_RESULTS)] = 10,
    ) -> ItemsOut:
        """Movies whose title (or year) holds every word of the query: the ones the query's words start first,
        then the most watched."""
        return ItemsOut(items=[ItemOut.of(found) for found in recommender.search(query, limit)])

    @app.get("/v1/genres", response_model=GenresOut, responses=errors(), tags=["items"])
    def genres() -> GenresOut:
        return GenresOut(genres=recommender.genre_names)

    @app.get("/v1/users/{user_id}/history", response_model=UserHistoryOut, responses=errors(404, 422), tags=["users"])
    def user_history(
        user_id: Annotated[int, Path(ge=0, le=MAX_ID, description="original MovieLens userId")],
        limit: Annotated[int, Query(ge=1, le=MAX_HISTORY, description="the last `limit` movies")] = MAX_HISTORY,
    ) -> UserHistoryOut:
        """A known user's movies, oldest first (at most the `POST /v1/recommendations` history limit)."""
        return UserHistoryOut(userId=user_id, items=[ItemOut.of(i) for i in recommender.history_items(user_id, limit)])

    @app.post(
        "/v1/recommendations/explained",
        response_model=ExplainedResponse,
        responses=errors(411, 422),
        tags=["recommendations"],
    )
    def explained_recommendations(request: ExplainRequest) -> ExplainedResponse:
        """Top-k for a new person, as `POST /v1/recommendations` (only movies of `genre` when given), each naming
        the history movie whose leaving-out lowers its score most."""
        result = recommender.recommend_explained(request.history, request.k, request.genre)
        return ExplainedResponse(
            recommendations=[ExplainedOut.of(r) for r in result.recommendations],
            unknownMovieIds=result.unknown_movie_ids,
        )

    page = {name: (files("movierec.serving") / "page" / name).read_bytes() for name in PAGE_FILES}

    @app.get("/", include_in_schema=False)
    def front_page() -> Response:
        return Response(page["index.html"], media_type=PAGE_FILES["index.html"], headers=PAGE_HEADERS)

    @app.get("/page/{name}", include_in_schema=False)
    def page_file(name: str) -> Response:
        if name not in page:  # a name, never a path: only the bundled files are served
            raise StarletteHTTPException(404, f"no page file {name!r}")
        return Response(page[name], media_type=PAGE_FILES[name], headers=PAGE_HEADERS)

    return app
