// Generated images: the API's image routes need the Authorization header, so images are fetched as blobs and shown
// through object URLs (revoked when the page is left). Generations are polled until they end.

import { fetchBlob, get, post } from "./api.js";
import { actionButton, announce, badge, h, replace } from "./dom.js";

export const ENDED = new Set(["succeeded", "failed", "canceled"]);

/** The image's path on this gateway (the answer's `url` is built from KRONA_PUBLIC_URL, which may differ). */
export function imagePath(generationId, index) {
  return `/v1/generations/${encodeURIComponent(generationId)}/images/${index}`;
}

/** An <img> of one generated image, fetched with the key; `onLoad` is called once it is shown. */
export function authImage(ctx, generation, image, { onLoad, size = null } = {}) {
  const alt = `Image ${image.index + 1} of “${generation.prompt}” (seed ${image.seed})`;
  const holder = h("figure", { class: "tile loading" }, h("div", { class: "placeholder" }, "Loading image…"));
  fetchBlob(imagePath(generation.id, image.index), { signal: ctx.signal })
    .then(({ blob }) => {
      const img = h("img", {
        src: ctx.objectUrl(blob),
        alt,
        width: size || generation.width,
        height: size || generation.height,
        class: "generated",
        "data-generation": generation.id,
        "data-index": image.index,
      });
      img.addEventListener("load", () => onLoad && onLoad(img), { once: true });
      holder.classList.remove("loading");
      replace(holder, img, h("figcaption", {}, `seed ${image.seed}`));
    })
    .catch((error) => {
      if (error.name === "AbortError") return;
      holder.classList.remove("loading");
      replace(holder, h("div", { class: "placeholder error", role: "alert" }, error.message));
    });
  return holder;
}

/** Placeholder tiles while a generation is queued or running. */
export function pendingTiles(generation) {
  const state =
    generation.status === "queued"
      ? `queued${generation.queue_position ? ` (position ${generation.queue_position})` : ""}`
      : (generation.phase || generation.status).replace(/_/g, " ");
  return Array.from({ length: generation.num_images }, (_, i) =>
    h("figure", { class: "tile pending" }, h("div", { class: "placeholder" }, `Image ${i + 1}: ${state}…`)),
  );
}

/** Poll a generation every `interval` ms until it ends; `onUpdate` sees every answer. Resolves with the last. */
export async function pollGeneration(ctx, id, onUpdate, interval = 1000) {
  for (;;) {
    const generation = await get(`/v1/generations/${encodeURIComponent(id)}`, { signal: ctx.signal });
    onUpdate(generation);
    if (ENDED.has(generation.status)) return generation;
    await ctx.sleep(interval);
  }
}

/** A card for one generation: its prompt and settings, its state, then its images as they arrive. */
export function generationCard(ctx, generation, { onImage } = {}) {
  const tiles = h("div", { class: "tiles", "aria-live": "polite" });
  const state = h("p", { class: "state" });
  const cancel = actionButton(
    "Cancel",
    async () => {
      try {
        card.update(await post(`/v1/generations/${generation.id}/cancel`, undefined, { signal: ctx.signal }));
        announce("Cancel requested");
      } catch (error) {
        if (error.name !== "AbortError") replace(state, badge("error"), ` ${error.message}`);
      }
    },
    { class: "secondary small", "aria-label": `Cancel the generation “${generation.prompt}”` },
  );
  const card = h(
    "article",
    { class: "card generation", "data-generation": generation.id, "aria-label": `Generation ${generation.id}` },
    h("h3", {}, generation.prompt),
    h(
      "p",
      { class: "hint" },
      `${generation.num_images} × ${generation.width}×${generation.height}, ${generation.steps} steps, seed ${generation.seed}`,
      generation.adapter_id ? `, adapter ${generation.adapter_id} at ${generation.adapter_scale}` : ", base model",
    ),
    state,
    tiles,
  );
  let shown = null;
  card.update = (g) => {
    replace(state, badge(g.status), g.error ? ` ${g.error.message} (${g.error.code})` : "", g.status === "queued" || g.status === "running" ? [" ", cancel] : null);
    if (g.status === "succeeded" && shown !== "images") {
      shown = "images";
      if (g.images_expired_at) {
        replace(tiles, h("p", {}, "These images were deleted after the server's retention time."));
      } else {
        replace(tiles, g.images.map((image) => authImage(ctx, g, image, { onLoad: onImage })));
      }
    } else if (!ENDED.has(g.status)) {
      replace(tiles, pendingTiles(g));
    } else if (g.status !== "succeeded") {
      replace(tiles);
    }
  };
  card.update(generation);
  return card;
}
