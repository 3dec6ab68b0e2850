// fluxray's page: a form over the async jobs API, live progress and previews from the job's events,
// and a gallery of results. No build step and nothing fetched from elsewhere: it talks only to the
// server that served it. Events are read with fetch (not EventSource) so that an API key can go in
// the Authorization header. Every path is relative to <base>, which the server sets to the
// application's route prefix, so the page works under any prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const TERMINAL = ["succeeded", "failed", "cancelled"];

function apiKey() {
  return $("api-key").value.trim();
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// An absolute API path ("/v1/...", as the job's links are) under this application's prefix.
function under(path) {
  return new URL(path.replace(/^\//, ""), document.baseURI).href;
}

// A call to the API; throws an Error with the API's own message when it answers an error.
async function api(path, options = {}) {
  const response = await fetch(under(path), { ...options, headers: headers(options.headers || {}) });
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try {
      const body = await response.json();
      if (body.error && body.error.message) message = body.error.message;
    } catch (_) { /* not JSON: keep the status */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadModels() {
  try {
    const models = await (await api("/v1/models")).json();
    $("model").replaceChildren(...models.data.map((m) => new Option(m.id, m.id)));
    showError("");
  } catch (error) {
    if (error.status === 401) {
      $("key-row").hidden = false;
      showError(apiKey() ? error.message : "This server needs an API key: enter it above.");
    } else {
      showError(error.message);
    }
  }
}

function requestBody() {
  const body = {
    prompt: $("prompt").value,
    model: $("model").value || undefined,
    size: $("size").value,
    n: Number($("n").value),
    num_inference_steps: Number($("steps").value),
    guidance_scale: Number($("guidance").value),
  };
  if (!$("random-seed").checked) body.seed = Number($("seed").value);
  const negative = $("negative").value.trim();
  const cfg = Number($("cfg").value);
  if (negative && cfg > 1) {
    body.negative_prompt = negative;
    body.true_cfg_scale = cfg;
  }
  return body;
}

// Server-Sent Events over fetch: calls onEvent(name, data) for each event until a terminal one.
async function followEvents(job, onEvent) {
  const response = await api(job.links.events, { headers: { Accept: "text/event-stream" } });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (!data) continue;
      onEvent(name, JSON.parse(data));
      if (TERMINAL.includes(name)) {
        reader.cancel();
        return;
      }
    }
  }
}

function snippets(request, seed) {
  const body = { ...request, n: 1, seed };
  const json = JSON.stringify(body);
  const curl = `curl -s ${under("/generate")} -H 'content-type: application/json'` +
    (apiKey() ? ` -H 'Authorization: Bearer $FLUXRAY_API_KEY'` : "") +
    ` \\\n  -d '${json.replace(/'/g, "'\\''")}' -o image.png`;
  const { prompt, model, size, ...extra } = body;
  const python = [
    "import base64",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url="${under("/v1")}", api_key="${apiKey() ? "$FLUXRAY_API_KEY" : "unused"}")`,
    "result = client.images.generate(",
    `    model=${JSON.stringify(model || "tiny")}, prompt=${JSON.stringify(prompt)}, size=${JSON.stringify(size)},`,
    `    response_format="b64_json", extra_body=${JSON.stringify(extra)},`,
    ")",
    'open("image.png", "wb").write(base64.b64decode(result.data[0].b64_json))',
  ].join("\n");
  return { curl, python };
}

function addResults(job) {
  const request = job.request;
  for (const image of job.data) {
    const card = $("card").content.firstElementChild.cloneNode(true);
    const format = request.output_format || "png";
    const src = `data:image/${format};base64,${image.b64_json}`;
    card.querySelector("img").src = src;
    card.querySelector("img").alt = request.prompt;
    card.querySelector("img").dataset.seed = image.seed;
    card.querySelector(".params").textContent =
      `seed ${image.seed} · ${request.size || "default size"} · ${request.num_inference_steps || "default"} steps · ` +
      `guidance ${request.guidance_scale ?? "default"} · ${request.prompt}`;
    const link = card.querySelector(".download");
    link.href = src;
    link.download = `fluxray-${image.seed}.${format}`;
    const { curl, python } = snippets(request, image.seed);
    card.querySelector(".curl").textContent = curl;
    card.querySelector(".python").textContent = python;
    card.querySelector(".copy-curl").onclick = () => navigator.clipboard.writeText(curl);
    card.querySelector(".copy-python").onclick = () => navigator.clipboard.writeText(python);
    $("gallery").prepend(card);
  }
}

async function generate(event) {
  event.preventDefault();
  showError("");
  $("generate").disabled = true;
  $("status-box").hidden = false;
  $("preview").hidden = true;
  $("progress").value = 0;
  $("status").textContent = "submitting";
  try {
    const created = await api("/v1/images/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...requestBody(), preview: true }),
    });
    const job = await created.json();
    $("status").dataset.job = job.id;
    let outcome = null;
    await followEvents(job, (name, data) => {
      if (name === "queued") {
        $("status").textContent = `queued: ${data.position} ahead, about ${Math.ceil(data.eta_s)} s`;
      } else if (name === "started") {
        $("status").textContent = "running";
      } else if (name === "progress") {
        $("progress").max = data.steps;
        $("progress").value = data.step;
        $("status").textContent = `step ${data.step} of ${data.steps}, about ${Math.ceil(data.eta_s)} s left`;
        if (data.preview) {
          $("preview").src = data.preview;
          $("preview").hidden = false;
        }
      } else if (TERMINAL.includes(name)) {
        outcome = { name, data };
      }
    });
    const done = await (await api(job.links.self)).json();
    $("status").textContent = done.status;
    if (done.status === "succeeded") addResults(done);
    else showError(done.error ? done.error.message : `the job was ${done.status}`);
    if (!outcome) showError("the server closed the event stream early");
  } catch (error) {
    $("status").textContent = "error";
    showError(error.message);
  } finally {
    $("generate").disabled = false;
  }
}

$("form").addEventListener("submit", generate);
$("api-key").addEventListener("change", loadModels);
loadModels();
