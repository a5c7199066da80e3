"""HTTP service over a Localizer (FastAPI): upload endpoint, health, thumbnails, map data and a web page.

Endpoints:
  GET  /                      the web page (static/index.html): upload a photo, see its matches and a map
  GET  /api/health            {"status": "ok", index size, model name and fingerprint, limits}
  POST /api/localize?k=5      multipart field ``image`` -> {"headline": {...}, "matches": [...], "decision": {...},
                              "ms": ...} (``headline``: the answer to act on, see ``localize.Answer.headline``);
                              optional ``keep_ratio`` / ``sparsity`` override the index's runtime knobs for this
                              query; a GNSS prior ``lat``+``lon`` (or ``east``+``north``) + ``radius_m`` limits
                              the search to the database images within it
  POST /api/localize_sequence?length=10&method=seqslam
                              repeated multipart field ``images`` (frames in capture order, <= max_frames) ->
                              {"frames": [per frame: headline (the sequence answer), matches, decision, sequence]}
  GET  /api/thumb/{id}        JPEG thumbnail (<= 320 px) of a database image
  GET  /api/map               database positions (<= 5000, evenly spaced) for the map

Bad uploads get a 4xx with a one-line ``detail``: 413 for a body over ``max_upload_bytes``, an image over
``max_pixels`` or a sequence whose frames together (from their headers, before any is decoded) exceed
``max_request_pixels`` (frames are then decoded one at a time, as the stream reaches them), 400 for a missing
field or a file that is not a readable image. The body limit holds while the
body streams in, whatever the transfer encoding (``BodyLimit``: refused from a Content-Length before reading,
and a chunked body is cut off as soon as it passes the limit), so neither memory nor the temporary files of
the multipart parser grow past it. The server keeps serving after any of them.
"""

from __future__ import annotations

import io
import json
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, UploadFile
from fastapi.responses import HTMLResponse, Response
from PIL import Image, ImageOps, UnidentifiedImageError

from ..data.images import decode_work_problem
from .decision import GeoPrior
from .inputs import Frame
from .localize import Localizer

THUMB_PX = 320


@dataclass
class ServiceLimits:
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    max_k: int = 50
    max_frames: int = 60
    #: all frames of one request together, checked from their headers before any is decoded
    max_request_pixels: int = 100_000_000
    #: requests decoded and answered at once (each with the process's ``--threads``); the others wait their turn,
    #: so requests do not fight over the cores
    concurrency: int = 1

    def __post_init__(self) -> None:  # e.g. --max-upload-mb 1.5 gives a float byte count
        self.max_upload_bytes, self.max_pixels, self.max_k, self.max_frames, self.max_request_pixels, \
            self.concurrency = (int(v) for v in (self.max_upload_bytes, self.max_pixels, self.max_k, self.max_frames,
                                                 self.max_request_pixels, self.concurrency))


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body may not pass ``limit`` + ``slack`` bytes (the slack is room for the
    multipart framing around an upload of ``limit`` bytes), counted as it is received.

    With a Content-Length over the limit the request is answered 413 before any body byte is read; otherwise
    the byte count is kept as chunks arrive, and the first chunk past the limit stops the read (the app's
    body parser sees an error) and the answer is replaced by a 413.
    """

    def __init__(self, app, limit: int, slack: int = 65536) -> None:
        self.app, self.limit, self.cap = app, limit, limit + slack

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.cap:
            await self._refuse(send, f"upload of {int(length)} bytes exceeds the limit of {self.limit}")
            return
        received, over, started = 0, False, False

        async def counting_receive():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.cap:
                    over = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if over:  # whatever the app answers once the body was cut off, the client gets the 413
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            pass
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._refuse(send, f"upload of more than {self.cap} bytes exceeds the limit of {self.limit}")

    @staticmethod
    async def _refuse(send, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class UploadError(ValueError):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def decode_upload(data: bytes, limits: ServiceLimits, header_only: bool = False) -> Image.Image:
    """Bytes of an uploaded photo -> upright RGB image, or UploadError(4xx, reason). ``header_only``: read the
    header and check the declared size only (nothing is decoded; the image is returned unloaded)."""
    if not data:
        raise UploadError(400, "empty upload: send the photo in the multipart field 'image'")
    if len(data) > limits.max_upload_bytes:
        raise UploadError(413, f"upload of {len(data)} bytes exceeds the limit of {limits.max_upload_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > limits.max_pixels:
                raise UploadError(413, f"image of {w}x{h} = {w * h} pixels exceeds the limit of {limits.max_pixels}")
            if why := decode_work_problem(img.format, data):
                raise UploadError(413, why)
            if header_only:
                return img
            img.load()
            return ImageOps.exif_transpose(img).convert("RGB")
    except UploadError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UploadError(400 if isinstance(e, UnidentifiedImageError) else 413,
                          "not a readable image (JPEG, PNG, WebP, ...)" if isinstance(e, UnidentifiedImageError)
                          else str(e).splitlines()[0]) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UploadError(400, f"corrupt or truncated image: {str(e).splitlines()[0]}") from None


def create_app(localizer: Localizer, limits: ServiceLimits | None = None):
    """The FastAPI application serving ``localizer``."""
    limits = limits or ServiceLimits()
    # no /docs, /redoc or /openapi.json: Swagger UI loads from a CDN, and the API is documented in the module docstring
    app = FastAPI(title="edgevpr", description="Visual place recognition: localize a photo against a place index",
                  docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("edgevpr.deploy").joinpath("static/index.html").read_text()

    app.add_middleware(BodyLimit, limit=limits.max_upload_bytes)

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        return page

    @app.get("/api/health")
    def health() -> dict:
        index, _ = localizer.refresh()
        m = index.model
        return {"status": "ok", "images": len(index), "generation": index.generation, "model": m["name"],
                "fingerprint": m["fingerprint"],
                "knobs": m["knobs"], "kind": index.manifest["kind"], "dim": index.manifest["dim"],
                "calibration": {**{k: cal[k] for k in ("threshold", "target_precision", "precision", "queries")},
                                "verify": cal.get("verify", 0), "verify_features": cal.get("verify_features", "")}
                if (cal := index.manifest.get("calibration")) else None,
                "limits": {"max_upload_bytes": limits.max_upload_bytes, "max_pixels": limits.max_pixels,
                           "max_k": limits.max_k, "max_frames": limits.max_frames,
                           "max_request_pixels": limits.max_request_pixels}}

    def options(k: int, keep_ratio: float | None, sparsity: float | None, lat: float | None, lon: float | None,
                east: float | None, north: float | None, radius_m: float | None) -> tuple[dict, GeoPrior | None]:
        knobs = {n: v for n, v in (("keep_ratio", keep_ratio), ("sparsity", sparsity)) if v is not None}
        for name, v in knobs.items():
            if not 0.0 <= v <= 1.0 or (name == "keep_ratio" and v == 0.0):
                raise HTTPException(400, f"{name}={v}: must be in (0, 1] for keep_ratio, [0, 1] for sparsity")
        if not 1 <= k <= limits.max_k:
            raise HTTPException(400, f"k={k}: must be between 1 and {limits.max_k}")
        if radius_m is None and any(v is not None for v in (lat, lon, east, north)):
            raise HTTPException(400, "a GNSS prior needs radius_m (metres) with lat/lon or east/north")
        try:
            prior = GeoPrior(radius_m, lat, lon, east, north) if radius_m is not None else None
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        return knobs, prior

    def decoded(upload: UploadFile, data: bytes | None = None, header_only: bool = False) -> Image.Image:
        try:
            if data is None:
                data = upload.file.read(limits.max_upload_bytes + 1)
            return decode_upload(data, limits, header_only)
        except UploadError as e:
            raise HTTPException(e.status, f"{upload.filename}: {e}") from None

    def answered(answer, name: str | None, size: tuple[int, int], ms: float) -> dict:
        out = answer.to_dict()
        head = [out["headline"]["match"]] if out["headline"]["match"] else []
        for m in out["matches"] + head + ([out["sequence"]["match"]] if "sequence" in out else []):
            m["name"] = Path(m["path"]).name
            m["thumb"] = f"/api/thumb/{m['id']}"
        return {"filename": name, "width": size[0], "height": size[1], "ms": ms, **out}

    busy = threading.BoundedSemaphore(limits.concurrency)

    def run(fn):
        try:
            return fn()
        except ValueError as e:  # a knob this model does not have, one baked into an ONNX graph, a prior's field
            raise HTTPException(400, str(e).splitlines()[0]) from None

    @app.post("/api/localize")
    def localize(image: UploadFile | None = File(None), k: int = 5, keep_ratio: float | None = None,
                 sparsity: float | None = None, lat: float | None = None, lon: float | None = None,
                 east: float | None = None, north: float | None = None, radius_m: float | None = None) -> dict:
        if image is None:
            raise HTTPException(400, "missing multipart field 'image'")
        knobs, prior = options(k, keep_ratio, sparsity, lat, lon, east, north, radius_m)
        with busy:
            img = decoded(image)
            t0 = time.perf_counter()
            answer = run(lambda: localizer.answer_images([img], k, knobs, prior, [image.filename or "image"])[0])
        return {"k": k, "knobs": {**localizer.knobs, **knobs}, "prior": prior and asdict(prior),
                **answered(answer, image.filename, img.size, (time.perf_counter() - t0) * 1000)}

    @app.post("/api/localize_sequence")
    def localize_sequence(images: list[UploadFile] | None = File(None), k: int = 5, length: int = 10,
                          method: str = "seqslam", keep_ratio: float | None = None, sparsity: float | None = None,
                          lat: float | None = None, lon: float | None = None, east: float | None = None,
                          north: float | None = None, radius_m: float | None = None) -> dict:
        """Frames in capture order (repeated multipart field ``images``) -> per frame its answer and the
        sequence match over the frames up to it (causal, as ``edgevpr localize --sequence``)."""
        if not images:
            raise HTTPException(400, "missing multipart field 'images' (the frames, in order)")
        if len(images) > limits.max_frames:
            raise HTTPException(413, f"{len(images)} frames: at most {limits.max_frames} per request")
        if not 1 <= length <= 1000:
            raise HTTPException(400, f"length={length}: must be between 1 and 1000")
        knobs, prior = options(k, keep_ratio, sparsity, lat, lon, east, north, radius_m)
        with busy:  # bodies are read into memory only by the requests being served (--concurrency of them)
            data = [u.file.read(limits.max_upload_bytes + 1) for u in images]
            total = 0
            for u, b in zip(images, data, strict=True):  # headers only: every size is known before any decoding
                with decoded(u, b, header_only=True) as im:
                    total += im.width * im.height
            if total > limits.max_request_pixels:
                raise HTTPException(413, f"{len(images)} frames of {total} pixels in all exceed the request limit of "
                                         f"{limits.max_request_pixels} (--max-request-pixels)")

            sizes: list[tuple[int, int]] = []

            def frames():  # decoded one at a time as the stream asks: one full-size frame in memory, not all of them
                for i, (u, b) in enumerate(zip(images, data, strict=True)):
                    img = decoded(u, b)
                    sizes.append(img.size)
                    yield Frame(u.filename or f"frame {i}", img)

            out = run(lambda: [answered(a, a.name, sizes[i], a.ms) for i, a in
                               enumerate(localizer.stream(frames(), k, knobs, prior, length, method))])
        return {"k": k, "length": length, "method": method, "knobs": {**localizer.knobs, **knobs},
                "prior": prior and asdict(prior), "frames": out}

    @app.get("/api/thumb/{image_id}")
    def thumb(image_id: int) -> Response:
        index, _ = localizer.refresh()
        row = index.rows([image_id]).get(image_id) if 0 <= image_id < len(index) else None
        if row is None:
            raise HTTPException(404, f"no database image with id {image_id}")
        try:
            with Image.open(row[0]) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                im.thumbnail((THUMB_PX, THUMB_PX))
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=85)
        except OSError as e:
            raise HTTPException(404, f"{Path(row[0]).name}: cannot read the database image "
                                     f"({type(e).__name__})") from None
        return Response(buf.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/map")
    def map_points() -> dict:
        return localizer.refresh()[0].positions()

    return app
