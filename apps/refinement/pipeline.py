"""The four stimulus pipelines of InsPilot, with the independent steps run concurrently.

The original ran every chat call one after another and only fanned out the SD calls.
Here a `Run` (one /generate call) owns a small thread pool: text steps that do not
feed the images (concept texts, function texts) run while the image chain (scenes ->
SD prompts -> images) proceeds, and every image of a chain goes to the image provider
in one `generate_many`. Each model reply is structured JSON whose arrays are pinned to
the exact count (minItems = maxItems = N), so "counts disagree" cannot happen silently:
a wrong count is repaired once by agent.llm, else it is a ModelError.

Every step is recorded with its template name + hash, generation id and timing (relative
to the start of the run) so the stored stimuli carry their provenance.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from agent.llm import CallContext
from agent.types import ImageRequest
from apps.core.context import Services

from . import labels
from .images import generate_images, image_request, sd_options

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ schemas with exact counts
def exact_counts(schema: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
    """Copy of a template's schema with arrays pinned: {"products": 6, "schemes[].scenes": 2}."""
    out = copy.deepcopy(schema)
    for path, n in counts.items():
        node = out
        for part in path.split("."):
            many = part.endswith("[]")
            node = node["properties"][part[:-2] if many else part]
            if many:
                node = node["items"]
        node["minItems"] = node["maxItems"] = n
    return out


def clean(value: Any) -> Any:
    """Trim every string of a model's JSON reply (the original kept stray spaces and empty pieces)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):
        return [clean(v) for v in value]
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------ one run
@dataclass
class GeneratedImage:
    id: str
    png: bytes
    role: str  # "scene" | "product"
    prompt: str  # the model-written SD prompt
    positive: str  # after the positive wrapper template
    negative: str
    width: int
    height: int
    generation_id: str | None
    instance: str | None
    templates: dict[str, dict[str, str]] = field(default_factory=dict)


class Run:
    """One /generate call: its model calls (concurrent where independent) and their provenance."""

    def __init__(
        self,
        svc: Services,
        *,
        request_id: str,
        username: str | None,
        session: str | None,
        language: str,
        max_workers: int = 4,
    ) -> None:
        self.svc = svc
        self.request_id = request_id
        self.username = username
        self.session = session
        self.language = language
        self.started = time.perf_counter()
        self.steps: list[dict[str, Any]] = []
        self.image_ids: list[str] = []
        self._lock = threading.Lock()
        self._futures: list[Future[Any]] = []
        self._pool = ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix=f"refine-{request_id[-6:]}"
        )

    # -- plumbing
    def template(self, name: str) -> str:
        return f"refinement/{self.language}/{name}"

    def _offset(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 1)

    def _add_step(self, step: dict[str, Any]) -> None:
        with self._lock:
            self.steps.append(step)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        future = self._pool.submit(fn, *args, **kwargs)
        with self._lock:
            self._futures.append(future)
        return future

    def close(self) -> None:
        """Wait for every step still running (so nothing is stored after a failed run is cleaned up)."""
        with self._lock:
            futures = list(self._futures)
        wait(futures)
        self._pool.shutdown(wait=True)

    def provenance(self) -> dict[str, dict[str, Any]]:
        """step -> {template, hash, generation_id(s)} of every step of this run."""
        out: dict[str, dict[str, Any]] = {}
        for s in sorted(self.steps, key=lambda s: s["started_ms"]):
            entry = {
                k: s[k]
                for k in ("kind", "template", "template_hash", "generation_id", "generation_ids")
                if s.get(k) is not None
            }
            out[s["step"]] = entry
        return out

    # -- text
    def chat(
        self,
        step: str,
        name: str,
        variables: dict[str, Any],
        *,
        counts: dict[str, int] | None = None,
        adjust: Callable[[dict[str, Any]], None] | None = None,
        images: list[str] | None = None,
    ) -> Any:
        """One templated JSON call; returns the cleaned, validated reply."""
        template = self.template(name)
        tpl = self.svc.prompts.get(template)
        schema = None
        if counts or adjust:
            schema = exact_counts(tpl.schema or {"type": "object"}, counts or {})
            if adjust:
                adjust(schema)
        started = self._offset()
        result = self.svc.llm.chat(
            template=template,
            variables=variables,
            schema=schema,
            images=images or None,
            context=CallContext(
                app=labels.APP, user=self.username, session=self.session, job=self.request_id, step=step
            ),
        )
        data = clean(result.data)
        self._add_step(
            {
                "step": step,
                "kind": "chat",
                "template": template,
                "template_hash": tpl.hash,
                "generation_id": result.generation_id,
                "provider": result.provider,
                "model": result.model,
                "attempts": result.attempts,
                "notes": result.notes,
                "output": data,
                "images_attached": len(images or []),
                "started_ms": started,
                "ended_ms": self._offset(),
            }
        )
        return data

    def wrap(self, name: str, variables: dict[str, Any]) -> tuple[str, dict[str, str]]:
        """Render an SD wrapper template (never sent to a language model)."""
        template = self.template(name)
        rendered = self.svc.prompts.render(template, variables)
        return rendered.messages[-1]["content"], {"template": template, "template_hash": rendered.hash}

    # -- images
    def images(self, step: str, role: str, prompts: list[str]) -> list[GeneratedImage]:
        """Wrap every prompt, then submit all of them at once; results in order, none empty."""
        opts = sd_options(self.svc.prompts, role)
        neg_text, neg_tpl = self.wrap(f"sd_{role}_negative", {})
        requests: list[ImageRequest] = []
        wrapped: list[tuple[str, dict[str, str]]] = []
        for i, prompt in enumerate(prompts):
            positive, pos_tpl = self.wrap(f"sd_{role}_positive", {"prompt": prompt})
            wrapped.append((positive, pos_tpl))
            requests.append(
                image_request(
                    opts,
                    prompt=positive,
                    negative_prompt=neg_text,
                    width=int(opts["width"]),
                    height=int(opts["height"]),
                    label=f"{role} {i + 1}",
                    context={
                        "app": labels.APP,
                        "user": self.username,
                        "session": self.session,
                        "job": self.request_id,
                        "step": step,
                        "kind": "stimulus",
                    },
                )
            )
        started = self._offset()
        results = generate_images(self.svc, requests)
        out: list[GeneratedImage] = []
        for req, res, (positive, pos_tpl) in zip(requests, results, wrapped, strict=True):
            with self._lock:
                self.image_ids.append(res.image_id)
            out.append(
                GeneratedImage(
                    id=res.image_id,
                    png=res.png,
                    role=role,
                    prompt=prompts[len(out)],
                    positive=positive,
                    negative=req.negative_prompt,
                    width=req.width,
                    height=req.height,
                    generation_id=res.generation_id,
                    instance=res.instance,
                    templates={"positive": pos_tpl, "negative": neg_tpl},
                )
            )
        self._add_step(
            {
                "step": step,
                "kind": "images",
                "template": f"{pos_tpl['template']} + {neg_tpl['template']}",
                "template_hash": f"{pos_tpl['template_hash']}+{neg_tpl['template_hash']}",
                "generation_ids": [g.generation_id for g in out],
                "image_ids": [g.id for g in out],
                "instances": [g.instance for g in out],
                "provider": results[0].provider if results else None,
                "started_ms": started,
                "ended_ms": self._offset(),
            }
        )
        return out


# ------------------------------------------------------------------ the pipelines
@dataclass
class Stimulus:
    """One generated creative: the stored form (image ids) plus the images' bytes for the reply."""

    index: int
    creative_type: int | None
    display_type: str | None
    items: list[dict[str, Any]]  # stored items: type, text, image_id, combinations
    images: list[GeneratedImage]
    texts: dict[str, Any]
    result: dict[str, Any] | None = None  # type 2
    extra: dict[str, Any] = field(default_factory=dict)


def item(
    kind: str,
    *,
    text: str | None = None,
    image: GeneratedImage | None = None,
    combinations: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {"type": kind, "text": text, "image_id": image.id if image else None, "combinations": combinations}


def _scene_chain(run: Run, stage: str, products: list[str], n: int) -> tuple[list[str], list[GeneratedImage]]:
    scenes = run.chat("scenes", "scenes", {"stage": stage, "products": products}, counts={"scenes": n})[
        "scenes"
    ]
    prompts = run.chat("scene_sd_prompts", "scene_sd_prompts", {"scenes": scenes}, counts={"prompts": n})[
        "prompts"
    ]
    return scenes, run.images("scene_images", "scene", prompts)


def _products(run: Run, stage: str, task: str, scheme: str, n: int) -> list[str]:
    return run.chat(
        "products",
        "products",
        {"stage": stage, "task": task, "scheme": scheme, "num": n},
        counts={"products": n},
    )["products"]


def _texts_beside(run: Run, stage: str, products: list[str], names: tuple[str, ...]) -> list[Future[Any]]:
    """Text steps that do not feed the images, started now so they run while the image chain does."""
    return [
        run.submit(
            run.chat, name, name, {"stage": stage, "products": products}, counts={"texts": len(products)}
        )
        for name in names
    ]


def rapid(run: Run, task: str, num: int) -> list[Stimulus]:
    """type 0: products -> (scenes -> SD prompts -> images) || concept texts."""
    products = _products(run, "rapid", task, "", num)
    (concepts,) = _texts_beside(run, "rapid", products, ("concept_texts",))
    scenes, images = _scene_chain(run, "rapid", products, num)
    texts = concepts.result()["texts"]
    return [
        Stimulus(
            index=i,
            creative_type=labels.CREATIVE_RAPID_ABSTRACT,
            display_type=labels.DISPLAY_SEQUENCE,
            items=[item(labels.ABSTRACT_IMAGE, image=images[i]), item(labels.ABSTRACT_TEXT, text=texts[i])],
            images=[images[i]],
            texts={"product": products[i], "scene": scenes[i], "concept": texts[i]},
        )
        for i in range(num)
    ]


DEEP_COUNT = 3  # fixed by the original


def deep(run: Run, task: str, texts: list[str], sketch_url: str | None) -> tuple[list[Stimulus], str | None]:
    """type 1: [vision name] -> products -> (scenes -> SD prompts -> images) || concepts || functions."""
    name = None
    if sketch_url is not None:
        name = run.chat("vision_name", "vision_name", {"task": task, "texts": texts}, images=[sketch_url])[
            "name"
        ]
    scheme = f"{name}:{','.join(texts)}" if name else ",".join(texts)
    n = DEEP_COUNT
    products = _products(run, "deep", task, scheme, n)
    concepts, functions = _texts_beside(run, "deep", products, ("concept_texts", "function_texts"))
    scenes, images = _scene_chain(run, "deep", products, n)
    concept_texts, function_texts = concepts.result()["texts"], functions.result()["texts"]
    stimuli = [
        Stimulus(
            index=i,
            creative_type=labels.CREATIVE_DEEP,
            display_type=labels.DISPLAY_SEQUENCE,
            items=[
                item(labels.ABSTRACT_IMAGE, image=images[i]),
                item(labels.ABSTRACT_TEXT, text=concept_texts[i]),
                item(labels.CONCRETE_TEXT, text=function_texts[i]),
            ],
            images=[images[i]],
            texts={
                "name": name,
                "scheme": scheme,
                "product": products[i],
                "scene": scenes[i],
                "concept": concept_texts[i],
                "function": function_texts[i],
            },
        )
        for i in range(n)
    ]
    return stimuli, name


def convergence_names(
    run: Run, task: str, schemes: list[dict[str, Any]], sketch_urls: list[str | None], select_num: int
) -> Stimulus:
    """type 2: name every scheme (with the sketches that exist) -> recommend `select_num` of them."""
    listed, images, k = [], [], 0
    for scheme, url in zip(schemes, sketch_urls, strict=True):
        if url is not None:
            k += 1
            images.append(url)
        listed.append({"texts": scheme["texts"], "image": k if url is not None else None})
    count = len(schemes)
    names = run.chat(
        "convergence_names",
        "convergence_names",
        {"task": task, "schemes": listed},
        counts={"names": count},
        images=images,
    )["names"]
    select = min(select_num, count)

    picked = run.chat(
        "recommend",
        "recommend",
        {
            "task": task,
            "select_num": select,
            "schemes": [{"name": names[i], "texts": s["texts"]} for i, s in enumerate(schemes)],
        },
        counts={"selected": select},
    )["selected"]
    # repeated or out-of-range numbers are dropped, not fatal (a grammar-constrained small model cannot be
    # held to them), so `selected` may be shorter than select_num, as the original contract allows
    valid = [i for i in dict.fromkeys(picked) if 1 <= i <= count]
    selected = [names[i - 1] for i in valid]
    return Stimulus(
        index=0,
        creative_type=None,
        display_type=None,
        items=[],
        images=[],
        texts={"schemes": [s["texts"] for s in schemes]},
        result={
            "names": names,
            "selected": selected,
            "selectedIndices": [i - 1 for i in valid],
            "dropped": [i for i in picked if i not in valid],
        },
    )


def convergence(run: Run, schemes: list[list[str]], num: int) -> list[Stimulus]:
    """type 3: (scenes -> SD prompts -> scene images) || (functions -> SD prompts -> product images)."""
    s = len(schemes)
    listed = [{"texts": t} for t in schemes]
    total = s * num

    def chain(
        items: str, texts_template: str, prompts_template: str, kind: str
    ) -> tuple[list[str], list[GeneratedImage]]:
        """texts per scheme (`items`) -> one SD prompt per text -> one image per prompt."""
        grouped = run.chat(
            texts_template,
            texts_template,
            {"schemes": listed, "num": num},
            counts={"schemes": s, f"schemes[].{items}": num},
        )["schemes"]
        texts = [x for g in grouped for x in g[items]]
        prompts = run.chat(prompts_template, prompts_template, {items: texts}, counts={"prompts": total})[
            "prompts"
        ]
        return texts, run.images(f"{kind}_images", kind, prompts)

    def scene_chain() -> tuple[list[str], list[GeneratedImage]]:
        return chain("scenes", "convergence_scenes", "scene_sd_prompts", "scene")

    def product_chain() -> tuple[list[str], list[GeneratedImage]]:
        return chain("functions", "convergence_functions", "product_sd_prompts", "product")

    products = run.submit(product_chain)
    scenes, scene_images = scene_chain()
    functions, product_images = products.result()
    out = []
    for i in range(total):
        group = [
            item(labels.ABSTRACT_IMAGE, image=scene_images[i]),
            item(labels.CONCRETE_IMAGE, image=product_images[i]),
            item(labels.CONCRETE_TEXT, text=functions[i]),
        ]
        out.append(
            Stimulus(
                index=i,
                creative_type=labels.CREATIVE_CONVERGENCE_GROUP_TWO,
                display_type=labels.DISPLAY_DIRECT,
                items=[item(labels.GROUP_TWO, combinations=group)],
                images=[scene_images[i], product_images[i]],
                texts={"schemeTexts": schemes[i // num], "scene": scenes[i], "function": functions[i]},
                extra={"scheme_index": i // num},
            )
        )
    return out
