// The page: choose or drop a radiograph, send it to /api/v1/predict, show the result.
// Plain JS, no build step, no external requests. Server text is only ever set with
// textContent, never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "covid-cxr-api-key";
  const state = {
    maxBytes: 20 * 1024 * 1024,
    original: null, // object URL or data URL of the radiograph
    overlay: null, // data URL of the heat map, when the server sent one
    pending: null, // the file waiting for an API key
  };

  const dropzone = $("dropzone");
  const input = $("file");
  const heatmap = $("heatmap");

  function apiKey() {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  }

  function headers() {
    const key = apiKey();
    return key ? { "X-API-Key": key } : {};
  }

  function formatBytes(n) {
    return n >= 1024 * 1024 ? `${(n / 1024 / 1024).toFixed(1)} MB` : `${Math.ceil(n / 1024)} KB`;
  }

  function percent(p) {
    return `${(p * 100).toFixed(1)} %`;
  }

  function showMessage(text, hint) {
    const message = $("message");
    message.textContent = text;
    if (hint) {
      const what = document.createElement("span");
      what.className = "hint";
      what.textContent = `What to do: ${hint}`;
      message.append(what);
    }
    message.hidden = !text;
  }

  function setStatus(text, busy = false) {
    $("status").textContent = text;
    $("status").setAttribute("aria-busy", busy ? "true" : "false");
  }

  // What the bytes are, whatever the name says: PNG, JPEG or DICOM ("DICM" at 128).
  async function sniff(file) {
    const head = new Uint8Array(await file.slice(0, 132).arrayBuffer());
    const starts = (bytes) => bytes.every((b, i) => head[i] === b);
    if (starts([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])) return "PNG";
    if (starts([0xff, 0xd8, 0xff])) return "JPEG";
    if (head.length >= 132 && String.fromCharCode(...head.slice(128, 132)) === "DICM") {
      return "DICOM";
    }
    return null;
  }

  async function check(file) {
    if (file.size === 0) return `“${file.name}” is empty (0 bytes).`;
    if (file.size > state.maxBytes) {
      return `“${file.name}” is ${formatBytes(file.size)}; the limit is ${formatBytes(state.maxBytes)}.`;
    }
    if ((await sniff(file)) === null) {
      return `“${file.name}” is not a PNG, JPEG or DICOM image. Choose the radiograph file itself.`;
    }
    return null;
  }

  function resetResult() {
    $("result").hidden = true;
    heatmap.disabled = true;
    if (state.original && state.original.startsWith("blob:")) URL.revokeObjectURL(state.original);
    state.original = null;
    state.overlay = null;
  }

  function showImage() {
    const image = $("image");
    const withMap = heatmap.checked && state.overlay;
    const src = withMap ? state.overlay : state.original;
    $("viewer").hidden = !src;
    if (src) image.src = src;
    image.alt = withMap
      ? "The radiograph with the Grad-CAM heat map over it (red: strongest evidence for COVID-19)"
      : "The radiograph as uploaded";
  }

  function showResult(result) {
    const p = result.probability;
    const t = result.threshold;
    $("verdict").textContent = result.positive ? "COVID-19 likely" : "COVID-19 unlikely";
    $("result").classList.toggle("positive", result.positive);
    $("bar-fill").style.width = `${(p * 100).toFixed(1)}%`;
    $("bar-marker").style.left = `${(t * 100).toFixed(1)}%`;
    $("bar").setAttribute(
      "aria-label",
      `probability ${percent(p)}, threshold ${percent(t)}`,
    );
    $("probability").textContent =
      `Probability of COVID-19: ${percent(p)} (threshold ${percent(t)}, ` +
      `${result.operating_point} operating point)`;
    $("fact-file").textContent = result.filename || "upload";
    $("fact-image").textContent = `${result.format}, ${result.width} × ${result.height} px`;
    $("fact-model").textContent = result.model_version;
    $("fact-time").textContent = `${Math.round(result.timings_ms.total)} ms on the server`;
    if (result.preview) state.original = `data:image/png;base64,${result.preview.png_base64}`;
    state.overlay = result.cam ? `data:image/png;base64,${result.cam.png_base64}` : null;
    heatmap.disabled = !state.overlay;
    $("result").hidden = false;
    showImage();
    // On a phone the result card sits below the image: bring it into view.
    $("result").scrollIntoView({ block: "nearest" });
    setStatus(
      `${$("verdict").textContent}: probability ${percent(p)}, threshold ${percent(t)}. ` +
        "Research use only, not a medical device.",
    );
  }

  function askForKey(file) {
    state.pending = file;
    $("key-form").hidden = false;
    $("api-key").focus();
  }

  async function analyse(file) {
    showMessage("");
    resetResult();
    const problem = await check(file);
    if (problem) {
      $("viewer").hidden = true;
      setStatus("No result: the file was not sent.");
      showMessage(problem);
      return;
    }
    const format = await sniff(file);
    if (format !== "DICOM") state.original = URL.createObjectURL(file);
    showImage();
    setStatus(`Analysing “${file.name}”…`, true);
    const body = new FormData();
    body.append("file", file, file.name);
    const query = format === "DICOM" ? "?cam=true&preview=true" : "?cam=true";
    let response;
    try {
      // A person would rather wait a few seconds than be told the server is busy.
      const wait = { ...headers(), Prefer: "wait=10" };
      response = await fetch(`/api/v1/predict${query}`, { method: "POST", body, headers: wait });
    } catch {
      setStatus("No result.");
      showMessage("The server could not be reached.", "Check that covid-cxr serve is running.");
      return;
    }
    let payload = null;
    try {
      payload = await response.json();
    } catch {
      payload = null;
    }
    if (response.ok && payload) {
      showResult(payload);
      return;
    }
    setStatus("No result.");
    $("viewer").hidden = true; // the server could not use the file: do not show it as if it had
    const error = payload && payload.error;
    if (response.status === 401) {
      sessionStorage.removeItem(KEY_STORAGE);
      askForKey(file);
    }
    showMessage(
      error ? error.message : `The server answered ${response.status}.`,
      error ? error.hint : "",
    );
  }

  async function loadModel() {
    let response;
    try {
      response = await fetch("/api/v1/model", { headers: headers() });
    } catch {
      $("model-info").textContent = "Model: server unreachable";
      return;
    }
    if (response.status === 401) {
      $("model-info").textContent = "Model: API key needed";
      askForKey(null);
      return;
    }
    if (!response.ok) {
      $("model-info").textContent = "Model: not ready";
      return;
    }
    const card = await response.json();
    state.maxBytes = card.service.max_upload_bytes;
    $("max-size").textContent = formatBytes(state.maxBytes);
    $("model-info").textContent =
      `Model: ${card.name} ${card.version}, threshold ${percent(card.threshold)} ` +
      `(${card.operating_point})`;
  }

  // The drop zone is the file input's <label>: Tab focuses the input, and Enter, Space or a
  // click open the browser's own file picker, with no script needed for that.
  input.addEventListener("change", () => {
    if (input.files.length) analyse(input.files[0]);
    input.value = "";
  });
  for (const name of ["dragenter", "dragover"]) {
    dropzone.addEventListener(name, (event) => {
      event.preventDefault();
      dropzone.classList.add("dragging");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    dropzone.addEventListener(name, () => dropzone.classList.remove("dragging"));
  }
  dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    const files = event.dataTransfer.files;
    if (!files.length) return;
    analyse(files[0]);
    if (files.length > 1) showMessage("Only the first of the dropped files was analysed.");
  });
  // A file dropped beside the zone must not make the browser navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  heatmap.addEventListener("change", showImage);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    $("key-form").hidden = true;
    showMessage("");
    loadModel();
    if (state.pending) analyse(state.pending);
    state.pending = null;
  });

  loadModel();
})();
