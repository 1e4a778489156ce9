"""One storybook, start to finish, as a job: plan -> pages streamed one by one, pictures in parallel.

Why this shape (see docs/storybook.md for the measurements):

1. Moderation of everything the reader typed. Flagged -> the job fails with code `moderated`.
2. **Plan** (`storybook/plan`): one JSON call with a schema whose `pages` array has exactly N
   items: title, a character/style sheet and, per page, a summary and a `scene` (what its
   picture shows). Grammar-constrained on the embedded model, validated + repaired once
   elsewhere. No `Page N:` parsing anywhere. The plan itself is moderated too.
3. **Illustrations start at once**: each page's Stable Diffusion prompt is the plan's scene
   plus the sheet (template `storybook/sd_prompt`), so every picture is submitted to the
   image provider the moment the plan exists, pages first, the cover last; the shared pool
   hands them out in that order. All pictures share one seed (and, with `chain_images`,
   each page is img2img from the previous one).
4. **Page texts** (`storybook/page`), meanwhile, one streamed plain-text call per page, in
   order. Plain text streams honestly on every provider (grammar-constrained JSON is not
   available while streaming on the embedded model), and the page count is exact by
   construction. Deltas are coalesced into `page.delta` events (first delta at once, then at
   most every DELTA_FLUSH_S) because every event is a database write.

Page 1 is therefore complete after plan + max(page-1 text, one picture), long before the last
page. Pictures are stored in GridFS by the image provider; with STORYBOOK_S3_BUCKET set they are also
uploaded to S3 and readers get expiring S3 URLs (apps/storybook/s3.py). Every step appends an event to the job's log; the two SSE views (the original's
snapshots and the JSON API's events) are folds of that log (apps/storybook/stream.py).

This module only sequences the steps; what each call is given is in book_prompts.py, the cleaning
of its text in text_cleanup.py, moderation in moderation.py and the ordered writes in writer.py.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from agent.llm import CallContext
from agent.textcheck import strip_echo
from agent.types import ImageRequest, ImageResult, ModelError
from apps.core.context import Services
from apps.core.errors import ApiError
from apps.core.jobs import JobCancelled, JobContext
from apps.core.storage import absolute_image_url

from .book_prompts import (
    build_sheet,
    page_variables,
    plan_instructions,
    plan_schema,
    plan_variables,
    sd_prompts,
    typed_text,
)
from .final_output import legacy_final_output
from .moderation import StepFailed, check_moderation
from .s3 import S3Images, s3_images
from .text_cleanup import clean_page, page_instructions, plan_field, plan_title
from .writer import Writer

log = logging.getLogger(__name__)

APP = "storybook"
COLLECTION = "storybooks"
DELTA_FLUSH_S = 0.15
IMAGE_SIDE = 512
CHAIN_DENOISE = 0.55
MAX_IMAGE_THREADS = 24
PAGE_ATTEMPTS = 2  # a page whose stream broke half-way is written again once (`page.reset` first)


def _now() -> datetime:
    return datetime.now(UTC)


class BookRunner:
    """Runs one book inside a job (`JobManager.submit(runner=BookRunner(...))`)."""

    def __init__(
        self, svc: Services, book_id: str, params: dict[str, Any], owner: str | None, base_url: str
    ) -> None:
        self.svc = svc
        self.book_id = book_id
        self.params = params
        self.owner = owner
        self.base_url = base_url
        self.n = int(params["pages"])
        self.ctx: JobContext | None = None
        self.step = "queued"
        self._lock = threading.Lock()  # guards the step counter
        self._writer = Writer(f"book-writer-{book_id[:6]}")
        self._abort = threading.Event()
        self._failure: BaseException | None = None
        self._done_steps = 0
        self._total_steps = 1 + self.n + self.n + 1  # plan, texts, pictures, cover
        self._stream_error: ModelError | None = None
        self.books = svc.db[COLLECTION]
        self.title = ""
        self.seed = 0
        self.s3: S3Images | None = s3_images(svc)

    # ------------------------------------------------------------------ plumbing
    def emit(self, type_: str, data: Any = None) -> None:
        """Append an event to the job's log (asynchronously, in order)."""
        assert self.ctx is not None
        self._writer.submit(self.ctx.event, type_, data)

    def _advance(self, message: str) -> dict[str, Any]:
        """Count one finished step; progress goes on the job doc (no extra event: it rides on ours)."""
        with self._lock:
            self._done_steps += 1
            progress = {"current": self._done_steps, "total": self._total_steps, "message": message}
            self._writer.submit(lambda p=progress: self.svc.jobs.update(self.book_id, progress=p))
        return progress

    def _call(self, step: str) -> CallContext:
        return CallContext(app=APP, user=self.owner, session=self.book_id, job=self.book_id, step=step)

    def _set(self, fields: dict[str, Any]) -> None:
        self._writer.submit(self.books.update_one, {"_id": self.book_id}, {"$set": fields})

    def _stage(self, name: str, message: str) -> None:
        self.step = name
        self.emit("stage", {"stage": name, "message": message})

    def _check(self) -> None:
        """Stop at once when the job was cancelled or a picture failed."""
        assert self.ctx is not None
        if self._abort.is_set() and self._failure is not None:
            raise self._failure
        self.ctx.check_cancelled()

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self._abort.set()

    def _image_url(self, image_id: str | None) -> str | None:
        return absolute_image_url(image_id, self.base_url) if image_id else None

    def _publish(self, name: str, result: ImageResult) -> tuple[str | None, str | None]:
        """(URL readers get, S3 key or None): the S3 copy's expiring URL when S3 is on, else ours."""
        if self.s3 is None:
            return self._image_url(result.image_id), None
        key = self.s3.key(self.book_id, name)
        self.s3.put(key, result.png)
        return self.s3.url(key), key

    # ------------------------------------------------------------------ the job
    def __call__(self, ctx: JobContext) -> dict[str, Any]:
        self.ctx = ctx
        self._set({"status": "working", "started_at": _now()})
        pool: ThreadPoolExecutor | None = None
        try:
            sheet, plan = self._plan()
            pool = ThreadPoolExecutor(
                max_workers=min(MAX_IMAGE_THREADS, self.n + 1), thread_name_prefix=f"book-{self.book_id[:6]}"
            )
            futures = self._submit_pictures(pool, sheet, plan)
            self._stage(
                "pages",
                f"writing {self.n} page{'s' if self.n != 1 else ''} while drawing {self.n + 1} pictures",
            )
            previous = ""
            for i in range(1, self.n + 1):
                self._check()
                previous = self._write_page(i, sheet, plan, previous)
            self._stage("finishing", "finishing the illustrations")
            self._wait(futures)
            return self._finish()
        except JobCancelled as exc:  # or JobShutdown: the book ends failed, code "shutdown"
            self._abort.set()
            self._set(
                {"status": exc.status, "finished_at": _now(), "error": {**exc.error, "step": self.step}}
            )
            self._writer.flush()
            raise
        except Exception as exc:
            self._abort.set()
            self._record_failure(exc)
            raise
        finally:
            if pool is not None:
                # wait for pictures already being drawn: their generation records, image writes and SD lease
                # releases must happen before the job ends (and before a shutting-down server closes the DB)
                pool.shutdown(wait=True, cancel_futures=True)
            self._writer.close()

    def _record_failure(self, exc: BaseException) -> None:
        if isinstance(exc, StepFailed):
            error = {"code": exc.code, "message": exc.message, "step": exc.step, **exc.extra}
        elif isinstance(exc, ModelError):
            what = "image service" if exc.kind == "image" else "language model"
            error = {
                "code": "model_error",
                "message": f"the {what} failed: {exc.message}",
                "step": self.step,
                "provider": exc.provider,
                "status": exc.status,
                "kind": exc.kind,
            }
        elif isinstance(exc, ApiError):
            error = {"code": exc.code, "message": exc.message, "step": self.step}
        else:
            error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}", "step": self.step}
        try:
            self.emit("error", error)
            self._set({"status": "failed", "finished_at": _now(), "error": error})
            self._writer.flush()
        except Exception:  # noqa: BLE001 - the job still ends failed through the core
            log.exception("book %s: could not record its failure", self.book_id)

    # ------------------------------------------------------------------ 1-2: moderation and plan
    def _plan(self) -> tuple[dict[str, Any], list[dict[str, str]]]:
        p = self.params
        self._stage("moderation", "checking the story idea")
        self._moderate(typed_text(p), "moderation", "The story idea was flagged by the content filter")
        self._check()

        self._stage("plan", "planning the book")
        template = self.svc.prompts.get("storybook/plan")
        variables = plan_variables(p, self.n)
        result = self.svc.llm.chat(
            template="storybook/plan",
            variables=variables,
            schema=plan_schema(template.schema or {}, self.n),
            params={"model": p.get("model"), "temperature": p.get("temperature")},
            context=self._call("plan"),
        )
        data = result.data or {}
        instructions = plan_instructions(self.svc.prompts, variables, p)
        title = plan_title(str(data.get("title") or ""), instructions, p["description"])
        raw_pages = list(data.get("pages") or [])[: self.n]
        if len(raw_pages) != self.n:  # validated against the schema; this guards a lenient provider
            raise ModelError(f"the plan has {len(raw_pages)} pages, not {self.n}", provider=result.provider)
        plan = []
        for pg in raw_pages:  # a field the model left as template syntax falls back to what is known
            summary = plan_field(str(pg.get("summary") or ""), p["description"])
            plan.append({"summary": summary, "scene": plan_field(str(pg.get("scene") or ""), summary)})
        sheet = build_sheet(p, data)
        self._moderate(
            "\n".join([title, *(x["summary"] + "\n" + x["scene"] for x in plan)]),
            "plan",
            "The generated story plan was flagged by the content filter",
        )
        seed = p.get("seed")
        seed = int(seed) if seed is not None else secrets.randbelow(2**31 - 1)
        pages = [
            {
                "page": i + 1,
                "summary": x["summary"],
                "scene": x["scene"],
                "text": None,
                "image_prompt": None,
                "image_id": None,
                "instance": None,
            }
            for i, x in enumerate(plan)
        ]
        self._set(
            {
                "title": title,
                "sheet": sheet,
                "seed": seed,
                "pages": pages,
                "plan_generation": result.generation_id,
            }
        )
        self.seed, self.title = seed, title
        progress = self._advance("plan")
        self.emit(
            "book.plan",
            {
                "title": title,
                "sheet": sheet,
                "seed": seed,
                "progress": progress,
                "pages": [{"page": i + 1, **x} for i, x in enumerate(plan)],
            },
        )
        return sheet, plan

    def _moderate(self, text: str, step: str, message: str) -> None:
        check_moderation(self.svc, text, self._call(step), step, message)

    # ------------------------------------------------------------------ 3: pictures
    def _submit_pictures(
        self, pool: ThreadPoolExecutor, sheet: dict[str, Any], plan: list[dict[str, str]]
    ) -> list[Future]:
        futures: list[Future] = []
        prompts = {}
        previous: Future | None = None
        for i, page in enumerate(plan, start=1):
            prompt, negative = sd_prompts(self.svc.prompts, "page", sheet, page["scene"])
            prompts[f"pages.{i - 1}.image_prompt"] = prompt
            request = self._image_request(prompt, negative, f"page {i}", "illustration")
            future = pool.submit(
                self._draw_page, i, request, previous if self.params.get("chain_images") else None
            )
            futures.append(future)
            previous = future
        prompt, negative = sd_prompts(self.svc.prompts, "cover", sheet, title=self.title)
        prompts["cover_prompt"] = prompt
        self._set(prompts)
        futures.append(pool.submit(self._draw_cover, self._image_request(prompt, negative, "cover", "cover")))
        return futures

    def _image_request(self, prompt: str, negative: str, label: str, kind: str) -> ImageRequest:
        return ImageRequest(
            prompt=prompt,
            negative_prompt=negative,
            width=IMAGE_SIDE,
            height=IMAGE_SIDE,
            seed=self.seed,
            label=label,
            context={
                "app": APP,
                "user": self.owner,
                "session": self.book_id,
                "job": self.book_id,
                "step": label,
                "kind": kind,
            },
        )

    def _generate(self, request: ImageRequest) -> ImageResult:
        if self._abort.is_set() or (self.ctx is not None and self.ctx.manager.aborting):  # no new picture
            raise JobCancelled()
        return self.svc.image_provider.generate(request)

    def _draw_page(self, i: int, request: ImageRequest, previous: Future | None) -> ImageResult | None:
        def draw() -> ImageResult:
            if previous is not None:
                before = previous.result()
                if before is not None:
                    request.init_image = before.png
                    request.denoising_strength = CHAIN_DENOISE
            result = self._generate(request)
            url, key = self._publish(f"page-{i}", result)
            self._set(
                {
                    f"pages.{i - 1}.image_id": result.image_id,
                    f"pages.{i - 1}.instance": result.instance,
                    f"pages.{i - 1}.s3_key": key,
                }
            )
            progress = self._advance(f"picture {i}")
            self.emit(
                "page.image",
                {
                    "page": i,
                    "url": url,
                    "image_id": result.image_id,
                    "instance": result.instance,
                    "seed": result.seed,
                    "progress": progress,
                },
            )
            return result

        return self._picture_step(draw, f"the illustration of page {i}", page=i)

    def _draw_cover(self, request: ImageRequest) -> ImageResult | None:
        def draw() -> ImageResult:
            result = self._generate(request)
            url, key = self._publish("cover", result)
            self._set({"cover": {"image_id": result.image_id, "instance": result.instance, "s3_key": key}})
            progress = self._advance("cover")
            self.emit(
                "cover",
                {"url": url, "image_id": result.image_id, "instance": result.instance, "progress": progress},
            )
            return result

        return self._picture_step(draw, "the cover illustration")

    def _picture_step(self, draw: Callable[[], ImageResult], what: str, **extra: Any) -> ImageResult | None:
        """Run one picture's step: None when the book was cancelled; a failure (a model error named
        after `what`) fails the book and is raised."""
        try:
            return draw()
        except JobCancelled:
            return None
        except Exception as exc:
            if (
                self.ctx is not None and self.ctx.manager.aborting
            ):  # the shutdown stopped it: not the picture's fault
                return None
            if isinstance(exc, ModelError):
                exc = StepFailed(
                    "model_error",
                    f"{what} failed: {exc.message}",
                    "illustrations",
                    provider=exc.provider,
                    kind=exc.kind,
                    **extra,
                )
            self._fail(exc)
            raise

    def _wait(self, futures: list[Future]) -> None:
        """Wait for every picture, still noticing a cancel or a failure at once."""
        for future in futures:
            while True:
                self._check()
                try:
                    future.result(timeout=0.25)
                    break
                except TimeoutError:
                    continue
                except BaseException:
                    self._check()  # raises the recorded failure
                    raise

    # ------------------------------------------------------------------ 4: page texts
    def _write_page(self, i: int, sheet: dict[str, Any], plan: list[dict[str, str]], previous: str) -> str:
        p = self.params
        variables = page_variables(p, self.title, sheet, plan, i, previous)
        params = {"model": p.get("model"), "temperature": p.get("temperature")}
        for attempt in range(1, PAGE_ATTEMPTS + 1):
            raw = self._stream_page(i, variables, params)
            if raw is None:  # the stream broke after some text: say so and write the page again
                if attempt < PAGE_ATTEMPTS:
                    self.emit(
                        "page.reset", {"page": i, "reason": "the model's stream broke; rewriting the page"}
                    )
                    continue
                raise self._stream_error or ModelError(f"page {i}: the stream broke", provider="")
            text = clean_page(strip_echo(raw, page_instructions(self.svc.prompts, variables)))
            if text:
                self._set({f"pages.{i - 1}.text": text})
                progress = self._advance(f"page {i} text")
                self.emit("page.text", {"page": i, "text": text, "progress": progress})
                return text
            if attempt < PAGE_ATTEMPTS:
                self.emit("page.reset", {"page": i, "reason": "the model wrote an empty page; trying again"})
        raise ModelError(
            f"the model wrote an empty text for page {i} twice", provider=self.svc.llm.provider.name
        )

    def _stream_page(self, i: int, variables: dict[str, Any], params: dict[str, Any]) -> str | None:
        """Stream one page; returns the raw text, or None when the stream broke after some text."""
        self._stream_error = None
        stream = self.svc.llm.chat(
            template="storybook/page",
            variables=variables,
            params=params,
            context=self._call(f"page {i}"),
            stream=True,
        )
        pieces: list[str] = []
        pending: list[str] = []
        last_flush = 0.0
        try:
            for delta in stream:
                pieces.append(delta)
                pending.append(delta)
                now = time.monotonic()
                if len(pieces) == 1 or now - last_flush >= DELTA_FLUSH_S:
                    self._check()
                    self.emit("page.delta", {"page": i, "delta": "".join(pending)})
                    pending.clear()
                    last_flush = now
            if pending:
                self.emit("page.delta", {"page": i, "delta": "".join(pending)})
        except ModelError as exc:
            if not pieces:
                raise
            self._stream_error = exc
            return None
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        return "".join(pieces)

    # ------------------------------------------------------------------ done
    def _finish(self) -> dict[str, Any]:
        self._writer.flush()
        doc = self.books.find_one({"_id": self.book_id}) or {}
        final = legacy_final_output(doc, self.base_url, self.s3)
        self._set({"status": "done", "finished_at": _now(), "final_output": final})
        self._writer.flush()  # the book is complete before the core appends `done`
        return {
            "book_id": self.book_id,
            "title": doc.get("title"),
            "pages": self.n,
            "illustrations": final["illustrations"],
            "cover": final.get("cover"),
        }
