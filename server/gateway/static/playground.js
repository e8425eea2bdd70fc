"use strict";
// The diffuserve playground: one page over the gateway's GET api/models and POST api/generate (server-sent events).

const $ = (id) => document.getElementById(id);

// The settings that describe a run, in the order the page lists them, with their labels.
const SETTINGS = [
  ["model", "model"],
  ["prompt", "prompt"],
  ["negative_prompt", "negative prompt"],
  ["steps", "steps"],
  ["guidance_scale", "guidance"],
  ["scheduler", "sampler"],
  ["seed", "seed"],
  ["size", "size"],
];
// Latent previews per run at most: every step of a short run, every few steps of a long one.
const MAX_PREVIEWS = 20;
// A grid's cells at most: each is a request to the server.
const MAX_GRID_CELLS = 64;
// The page's controls for the fields a server error may name.
const FIELD_CONTROLS = { width: "size", height: "size", seeds: "seed" };

let models = [];
let running = null; // the AbortController of the generate or grid running now
const runs = [];
let selected = []; // the run numbers ticked for comparison, oldest first

class RequestError extends Error {
  constructor(error) {
    super(`${error.code}: ${error.message}`);
    this.fields = error.fields || [];
  }
}

// Seeds the page draws are 32-bit: exact as JSON numbers (JavaScript's are exact only below 2^53).
function randomSeed() {
  return crypto.getRandomValues(new Uint32Array(1))[0];
}

function numberIn(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

function dataUrl(image) {
  return `data:${image.mime_type};base64,${image.data}`;
}

function setStatus(text) {
  $("status").textContent = text;
}

function setProgress(step, total) {
  $("progress").max = Math.max(1, total);
  $("progress").value = step;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
  for (const control of document.querySelectorAll("[aria-invalid]")) control.removeAttribute("aria-invalid");
}

function showError(error) {
  $("error").textContent = error.message;
  $("error").hidden = false;
  for (const field of error.fields || []) {
    const control = $(FIELD_CONTROLS[field] || field);
    if (control) control.setAttribute("aria-invalid", "true");
  }
}

async function errorOf(response) {
  const body = await response.json().catch(() => ({}));
  return new RequestError(body.error || { code: `HTTP ${response.status}`, message: response.statusText });
}

// Server-sent events from a fetch response (EventSource cannot POST): blocks split by blank lines.
async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      yield { name, data: JSON.parse(data) };
    }
  }
}

// One request: resolves to {images, completed} once the image is in; rejects with a RequestError (the server's
// status and message) or, when the signal aborts it, an AbortError (the gateway then cancels the server's job).
async function generate(request, signal, onEvent = () => {}) {
  const response = await fetch("api/generate", {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authorization() },
    body: JSON.stringify(request),
    signal,
  });
  if (!response.ok) throw await errorOf(response);
  const images = [];
  for await (const event of serverEvents(response)) {
    onEvent(event);
    if (event.name === "image") images.push(event.data);
    else if (event.name === "error") throw new RequestError(event.data);
    else if (event.name === "completed") return { images, completed: event.data };
  }
  throw new RequestError({ code: "UNAVAILABLE", message: "the stream ended before the image" });
}

// The token typed in, sent as a bearer token: the gateway forwards it to the server, which checks it.
function authorization() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function loadModels() {
  const response = await fetch("api/models", { headers: authorization() });
  if (!response.ok) throw await errorOf(response);
  models = (await response.json()).models;
  $("model").replaceChildren(...models.map((model) => new Option(model.name, model.name)));
  applyModel(models[0]);
}

function applyModel(model) {
  if (!model) return;
  const schedulers = model.schedulers.map((name) => {
    const chosen = name === model.default_scheduler;
    return new Option(name, name, chosen, chosen);
  });
  $("scheduler").replaceChildren(...schedulers);
  const sizes = model.sizes.map(({ width, height }, i) => new Option(`${width}x${height}`, `${width}x${height}`, !i, !i));
  $("size").replaceChildren(...sizes);
  $("steps").value = model.default_steps;
  $("steps").max = model.max_steps;
  $("guidance_scale").value = model.default_guidance_scale;
}

// The form as a request body; a blank number is left to the server's default.
function formRequest() {
  const [width, height] = ($("size").value || "0x0").split("x").map(Number);
  return {
    model: $("model").value,
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    steps: numberIn("steps"),
    guidance_scale: numberIn("guidance_scale"),
    scheduler: $("scheduler").value,
    width,
    height,
  };
}

// Locked: the seed shown. Unlocked: a new random seed every run, shown so it can be locked afterwards.
function seedForRun() {
  const typed = numberIn("seed");
  if ($("seed-lock").checked && typed !== null) return typed;
  const seed = randomSeed();
  $("seed").value = seed;
  return seed;
}

function defaultSteps() {
  const model = models.find((m) => m.name === $("model").value);
  return model ? model.default_steps : null;
}

function previewInterval(steps) {
  if (!$("previews").checked) return 0;
  const total = steps ?? defaultSteps() ?? MAX_PREVIEWS;
  return total >= 1 ? Math.max(1, Math.ceil(total / MAX_PREVIEWS)) : 0;
}

function begin() {
  clearError();
  running = new AbortController();
  $("generate").disabled = true;
  $("grid-run").disabled = true;
  $("cancel").disabled = false;
  return running;
}

function end() {
  running = null;
  $("generate").disabled = false;
  $("grid-run").disabled = false;
  $("cancel").disabled = true;
}

// Progress counts U-Net calls, which some samplers make more of than steps (Heun two a step, PNDM one extra): the
// bar follows the calls, the text the steps asked for.
function showEvent(steps, { name, data }) {
  if (name === "queued") {
    setStatus(data.position ? `queued: ${data.position} ahead` : "queued: next");
  } else if (name === "progress") {
    setProgress(data.step, data.total);
    const step = steps ? Math.max(1, Math.round((data.step * steps) / data.total)) : data.step;
    setStatus(`step ${step}/${steps || data.total}`);
    if (data.previews.length) {
      $("preview").src = dataUrl(data.previews[0]);
      $("preview").hidden = false;
    }
  }
}

async function onGenerate(event) {
  event.preventDefault();
  if (running) return;
  const request = formRequest();
  request.seed = seedForRun();
  request.preview_interval = previewInterval(request.steps);
  const controller = begin();
  setStatus("sending…");
  setProgress(0, 1);
  try {
    const steps = request.steps ?? defaultSteps();
    const run = addRun(await generate(request, controller.signal, (event) => showEvent(steps, event)));
    $("result").src = run.image;
    $("result").hidden = false;
    $("result-caption").textContent = `Run ${run.number}: ${summary(run.settings)}`;
    setStatus(`done: run ${run.number} in ${(run.totalMs / 1000).toFixed(2)} s, seed ${run.settings.seed}`);
  } catch (error) {
    if (error.name === "AbortError") {
      setStatus("cancelled");
      setProgress(0, 1);
    } else {
      showError(error);
      setStatus("failed");
    }
  } finally {
    end();
  }
}

function addRun({ images, completed }) {
  const settings = {
    model: completed.model,
    prompt: completed.prompt,
    negative_prompt: completed.negative_prompt,
    steps: completed.steps,
    guidance_scale: completed.guidance_scale,
    scheduler: completed.scheduler,
    seed: completed.seeds[0],
    size: `${completed.width}x${completed.height}`,
  };
  const run = { number: runs.length + 1, settings, image: dataUrl(images[0]), totalMs: completed.timings.total_ms };
  runs.push(run);
  $("history").append(historyItem(run));
  return run;
}

function summary(settings) {
  return `steps ${settings.steps} · seed ${settings.seed} · ${settings.scheduler} · guidance ${settings.guidance_scale} · ${settings.size}`;
}

function element(tag, properties = {}, ...children) {
  const node = Object.assign(document.createElement(tag), properties);
  node.append(...children);
  return node;
}

function historyItem(run) {
  const tick = element("input", { type: "checkbox" });
  tick.addEventListener("change", () => toggleCompare(run.number, tick.checked));
  const reuse = element("button", { type: "button", textContent: `Reuse run ${run.number}` });
  reuse.addEventListener("click", () => reuseSettings(run.settings));
  return element(
    "li",
    { id: `run-${run.number}` },
    element("img", { src: run.image, alt: `Run ${run.number}` }),
    element("span", { textContent: `Run ${run.number}: ${summary(run.settings)}` }),
    element("label", { className: "toggle" }, tick, `Compare run ${run.number}`),
    reuse,
  );
}

// The run's settings back in the form, its seed locked: change one setting and generate for an A/B pair.
function reuseSettings(settings) {
  $("model").value = settings.model;
  applyModel(models.find((model) => model.name === settings.model));
  for (const id of ["prompt", "negative_prompt", "steps", "guidance_scale", "scheduler", "seed", "size"]) {
    $(id).value = settings[id];
  }
  $("seed-lock").checked = true;
}

function toggleCompare(number, ticked) {
  selected = selected.filter((n) => n !== number);
  if (ticked) selected.push(number);
  while (selected.length > 2) {
    const dropped = selected.shift();
    document.querySelector(`#run-${dropped} input[type=checkbox]`).checked = false;
  }
  if (selected.length === 2) showComparison(...selected.map((n) => runs[n - 1]));
  else $("compare").hidden = true;
}

function showComparison(a, b) {
  const figure = (run) =>
    element(
      "figure",
      {},
      element("img", { src: run.image, alt: `Run ${run.number}, side by side` }),
      element("figcaption", { textContent: `Run ${run.number}` }),
    );
  $("compare-images").replaceChildren(figure(a), figure(b));
  const head = element(
    "tr",
    {},
    element("th", { scope: "col", textContent: "Setting" }),
    element("th", { scope: "col", textContent: `Run ${a.number}` }),
    element("th", { scope: "col", textContent: `Run ${b.number}` }),
  );
  $("compare-table").tHead.replaceChildren(head);
  const rows = SETTINGS.map(([key, label]) => {
    const differs = String(a.settings[key]) !== String(b.settings[key]);
    // Said in words as well as in colour.
    const name = element("th", { scope: "row", textContent: differs ? `${label} (differs)` : label });
    const row = element(
      "tr",
      { className: differs ? "differs" : "" },
      name,
      element("td", { textContent: a.settings[key] }),
      element("td", { textContent: b.settings[key] }),
    );
    row.dataset.setting = key;
    return row;
  });
  $("compare-table").tBodies[0].replaceChildren(...rows);
  $("compare").hidden = false;
}

class InputError extends Error {
  constructor(control, message) {
    super(message);
    this.fields = [control];
  }
}

function parseList(control, label, least) {
  const items = $(control).value.split(/[\s,]+/).filter(Boolean);
  if (!items.length) throw new InputError(control, `${label}: give at least one value, e.g. 20,35`);
  return items.map((item) => {
    const value = Number(item);
    if (!Number.isInteger(value) || value < least || value >= 2 ** 53) {
      throw new InputError(control, `${label}: ${item} is not a whole number ≥ ${least}`);
    }
    return value;
  });
}

function gridTable(base, stepsList, seeds) {
  const fixed = [
    `model ${base.model || "(the server's default)"}`,
    `prompt “${base.prompt}”`,
    base.negative_prompt ? `negative prompt “${base.negative_prompt}”` : "no negative prompt",
    `sampler ${base.scheduler || "(the model's default)"}`,
    `guidance ${base.guidance_scale ?? "(the model's default)"}`,
    `size ${base.width}x${base.height}`,
  ];
  const caption = element("caption", { textContent: `Steps × seeds; fixed: ${fixed.join(", ")}` });
  const head = element(
    "tr",
    {},
    element("th", { scope: "col", textContent: "seed \\ steps" }),
    ...stepsList.map((steps) => element("th", { scope: "col", textContent: `steps ${steps}` })),
  );
  const cells = new Map();
  const rows = seeds.map((seed) => {
    const row = element("tr", {}, element("th", { scope: "row", textContent: `seed ${seed}` }));
    for (const steps of stepsList) {
      const cell = element("td", { textContent: "waiting…" });
      cells.set(`${steps}/${seed}`, cell);
      row.append(cell);
    }
    return row;
  });
  const table = element("table", {}, caption, element("thead", {}, head), element("tbody", {}, ...rows));
  $("grid").replaceChildren(table);
  return cells;
}

// Every cell at once, so the server can batch the ones that share their steps.
async function onGrid(event) {
  event.preventDefault();
  if (running) return;
  clearError();
  let stepsList;
  let seeds;
  try {
    stepsList = parseList("grid-steps", "Steps list", 1);
    seeds = parseList("grid-seeds", "Seeds list", 0);
    if (stepsList.length * seeds.length > MAX_GRID_CELLS) {
      throw new InputError("grid-steps", `a grid has at most ${MAX_GRID_CELLS} cells, asked for ${stepsList.length * seeds.length}`);
    }
  } catch (error) {
    showError(error);
    return;
  }
  const base = formRequest();
  const cells = gridTable(base, stepsList, seeds);
  const controller = begin();
  const total = cells.size;
  let done = 0;
  let failure = null;
  const counted = () => {
    done += 1;
    $("grid-status").textContent = `grid: ${done}/${total} done`;
  };
  $("grid-status").textContent = `grid: 0/${total} done`;
  const cellRuns = [];
  for (const seed of seeds) {
    for (const steps of stepsList) {
      const cell = cells.get(`${steps}/${seed}`);
      const request = { ...base, steps, seed, preview_interval: 0 };
      const run = generate(request, controller.signal).then(
        ({ images }) => cell.replaceChildren(element("img", { src: dataUrl(images[0]), alt: `steps ${steps}, seed ${seed}` })),
        (error) => {
          cell.textContent = error.name === "AbortError" ? "cancelled" : error.message;
          if (error.name !== "AbortError") failure = failure || error;
        },
      );
      cellRuns.push(run.finally(counted));
    }
  }
  await Promise.all(cellRuns);
  const cancelled = controller.signal.aborted;
  end();
  if (failure) showError(failure);
  if (cancelled) $("grid-status").textContent = `grid cancelled: ${done}/${total} answered`;
}

function start() {
  $("settings").addEventListener("submit", onGenerate);
  $("grid-form").addEventListener("submit", onGrid);
  $("cancel").addEventListener("click", () => running && running.abort());
  $("model").addEventListener("change", () => applyModel(models.find((model) => model.name === $("model").value)));
  // A seed typed by hand is meant to stay.
  $("seed").addEventListener("input", () => {
    $("seed-lock").checked = true;
  });
  $("seed").value = randomSeed();
  $("token").value = sessionStorage.getItem("diffuserve-token") || "";
  // A new token is tried at once: the models list is the first thing it unlocks.
  $("token").addEventListener("change", () => {
    sessionStorage.setItem("diffuserve-token", $("token").value.trim());
    clearError();
    reload();
  });
  reload();
}

function reload() {
  loadModels().then(
    () => setStatus("Ready."),
    (error) => {
      showError(error);
      setStatus("could not load the models");
    },
  );
}

start();
