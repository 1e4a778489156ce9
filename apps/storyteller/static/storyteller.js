// StorAIteller page: settings -> streamed story (WebSocket, SSE fallback) -> edit / rewrite a part /
// good story / history. Every call carries this tab's session id; all URLs are relative to the page.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const els = {
    form: $("settings"), submit: $("submit"), prompt: $("prompt"), write: $("write"), stop: $("stop"),
    rewrite: $("rewrite"), saveEdit: $("save-edit"), good: $("good"), goodLabel: $("good-label"),
    status: $("status"), error: $("error"), progress: $("progress"), story: $("story"),
    history: $("history"), historyEmpty: $("history-empty"),
    signin: $("signin"), apikey: $("apikey"), signout: $("signout"), who: $("who"),
  };
  const KEY = "storyteller.session";
  // with AUTH_MODE=apikey: the key lives in this tab's sessionStorage only and goes out as X-API-Key;
  // streams (EventSource, WebSocket: no headers) get a short-lived token scoped to this session
  const API_KEY = "storyteller.apikey";
  // one session per tab (sessionStorage), sent with every call: two tabs never share a story
  function newSessionId() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }
  if (!sessionStorage.getItem(KEY)) sessionStorage.setItem(KEY, newSessionId());
  const state = {
    session: sessionStorage.getItem(KEY), version: null, versionText: "", liked: false,
    submitted: false, streaming: false, socket: null, source: null, hasStory: false,
  };

  function setStatus(text) { els.status.textContent = text; }
  function showError(text) { els.error.textContent = text; els.error.hidden = false; }
  function clearError() { els.error.textContent = ""; els.error.hidden = true; }
  function words(text) { const t = text.trim(); return t ? t.split(/\s+/).length : 0; }
  function dirty() { return state.version !== null && els.story.value !== state.versionText; }

  function refreshButtons() {
    const busy = state.streaming;
    const hasSel = els.story.selectionEnd > els.story.selectionStart;
    els.submit.disabled = busy;
    els.write.disabled = busy || !state.submitted;
    els.write.textContent = state.hasStory ? "Regenerate the story" : "Write a new story";
    els.stop.disabled = !busy;
    els.rewrite.disabled = busy || !state.hasStory || !hasSel;
    els.saveEdit.disabled = busy || !dirty() || !els.story.value.trim();
    els.good.disabled = busy || !state.hasStory || (state.liked && !dirty());
    els.good.setAttribute("aria-pressed", state.liked && !dirty() ? "true" : "false");
    els.goodLabel.textContent = state.liked && !dirty() ? "Story added to the next fine-tuning" : "Good story";
    els.story.readOnly = busy;
    els.story.setAttribute("aria-busy", busy ? "true" : "false");
    els.progress.hidden = !busy;
  }

  async function call(method, path, body) {
    const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
    const apiKey = sessionStorage.getItem(API_KEY);
    if (apiKey) init.headers["X-API-Key"] = apiKey;
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(state.session ? { ...body, session: state.session } : body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (err) {
      throw new Error("the server cannot be reached (" + err.message + ")");
    }
    let data = null;
    try { data = await resp.json(); } catch (err) { data = null; }
    if (!resp.ok) {
      const msg = (data && data.error && data.error.message) || ("HTTP " + resp.status);
      if (resp.status === 401) showSignIn(sessionStorage.getItem(API_KEY) ? "The key was refused." : "");
      const error = new Error(msg);
      error.status = resp.status;
      throw error;
    }
    return data;
  }

  // ---- sign in (AUTH_MODE=apikey); the form stays hidden while the server lets us in
  function showSignIn(message) {
    els.signin.hidden = false;
    els.signout.hidden = !sessionStorage.getItem(API_KEY);
    els.who.textContent = message || "This server needs an API key.";
  }
  async function whoAmI() {
    const headers = { Accept: "application/json" };
    const apiKey = sessionStorage.getItem(API_KEY);
    if (apiKey) headers["X-API-Key"] = apiKey;
    const resp = await fetch(new URL("../auth/me", window.location.href), { headers, credentials: "same-origin" });
    return resp.ok ? resp.json() : null;
  }
  async function checkSignIn() {
    let me = null;
    try { me = await whoAmI(); } catch (err) { me = null; }
    if (me && me.authenticated) {
      els.signin.hidden = false;
      els.apikey.hidden = true;
      els.signinButton.hidden = true;
      els.signout.hidden = !sessionStorage.getItem(API_KEY);
      els.who.textContent = "Signed in as " + me.user + ".";
      return true;
    }
    if (me && me.auth_mode === "none") { els.signin.hidden = true; return true; }
    els.apikey.hidden = false;
    els.signinButton.hidden = false;
    showSignIn(sessionStorage.getItem(API_KEY) ? "The key was refused." : "");
    return false;
  }
  els.signinButton = els.signin.querySelector("button[type=submit]");
  els.signin.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = els.apikey.value.trim();
    if (!key) { els.who.textContent = "Enter your API key."; return; }
    sessionStorage.setItem(API_KEY, key);
    els.apikey.value = "";
    if (await checkSignIn()) { clearError(); restore(); }
  });
  els.signout.addEventListener("click", () => {
    sessionStorage.removeItem(API_KEY);
    els.apikey.hidden = false;
    els.signinButton.hidden = false;
    showSignIn("Signed out.");
  });

  async function streamToken() {
    if (!sessionStorage.getItem(API_KEY)) return null;
    const data = await post("api/stream-token", {});
    return data.token;
  }
  const post = (path, body) => call("POST", path, body || {});
  const get = (path) => call("GET", path + (state.session ? (path.includes("?") ? "&" : "?") + "session=" +
    encodeURIComponent(state.session) : ""));

  function remember(session) {
    if (session && session !== state.session) {
      state.session = session;
      sessionStorage.setItem(KEY, session);
    }
  }

  function showVersion(v) {
    state.version = v.id;
    state.versionText = v.text;
    state.liked = !!v.feedback;
    state.hasStory = true;
    els.story.value = v.text;
    refreshButtons();
  }

  async function loadHistory(selectId) {
    if (!state.session) return;
    const data = await get("api/versions");
    els.history.textContent = "";
    els.historyEmpty.hidden = data.versions.length > 0;
    for (const v of data.versions) {
      const li = document.createElement("li");
      const btn = document.createElement("button");
      btn.type = "button";
      btn.textContent = "v" + v.n + " · " + v.kind + " · " + v.words + " words" + (v.feedback ? " · liked" : "");
      btn.setAttribute("aria-label", "Show version " + v.n + " (" + v.kind + ", " + v.words + " words" +
        (v.feedback ? ", liked" : "") + ")");
      if (v.id === (selectId || state.version)) btn.setAttribute("aria-current", "true");
      btn.addEventListener("click", () => {
        if (state.streaming) return;
        showVersion(v);
        clearError();
        setStatus("Showing version " + v.n + ".");
        for (const b of els.history.querySelectorAll("button")) b.removeAttribute("aria-current");
        btn.setAttribute("aria-current", "true");
      });
      li.appendChild(btn);
      els.history.appendChild(li);
    }
    return data;
  }

  function settingsPayload() {
    return {
      maincharacter: $("characters").value,
      keywords: $("keywords").value,
      genre: $("genre").value,
      registro: $("register").value,
      childsafe: $("childsafe").checked,
      maxnowords: parseInt($("maxwords").value, 10),
      twist: $("twist").checked,
    };
  }

  els.form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearError();
    const payload = settingsPayload();
    if (!payload.maincharacter.trim() || !payload.keywords.trim() || !Number.isInteger(payload.maxnowords)) {
      showError("Fill in the characters' names, the keywords and the maximum number of words.");
      return;
    }
    els.submit.disabled = true;
    setStatus("Saving the settings…");
    try {
      const data = await post("api/settings", payload);
      remember(data.session);
      state.submitted = true;
      els.prompt.textContent = data.prompt;
      setStatus("Settings saved. Press “" + (state.hasStory ? "Regenerate the story" : "Write a new story") + "”.");
    } catch (err) {
      showError("The settings were not saved: " + err.message);
      setStatus("");
    } finally {
      refreshButtons();
    }
  });
  els.form.addEventListener("reset", () => { clearError(); setTimeout(refreshButtons, 0); });

  function finishStream(message) {
    state.streaming = false;
    state.socket = null;
    if (state.source) { state.source.close(); state.source = null; }
    if (message) setStatus(message);
    refreshButtons();
  }

  function handleEvent(msg, ctx) {
    if (msg.type === "delta") {
      ctx.text += msg.text;
      els.story.value = ctx.text;
      els.story.scrollTop = els.story.scrollHeight;
      setStatus("Writing… " + words(ctx.text) + " words");
    } else if (msg.type === "done") {
      ctx.finished = true;
      state.version = msg.version;
      state.versionText = msg.story;
      state.liked = false;
      state.hasStory = true;
      els.story.value = msg.story;
      finishStream("Done: version " + msg.n + " (" + msg.kind + ", " + words(msg.story) + " words).");
      loadHistory(msg.version).catch((err) => showError("History not loaded: " + err.message));
    } else if (msg.type === "cancelled") {
      ctx.finished = true;
      if (state.version !== null) els.story.value = state.versionText;
      finishStream("Stopped. The story was not changed.");
    } else if (msg.type === "error") {
      ctx.finished = true;
      if (state.version !== null) els.story.value = state.versionText;
      showError(msg.message);
      finishStream("Failed.");
    }
  }

  async function startStream(action, label) {
    clearError();
    state.streaming = true;
    const ctx = { text: "", finished: false };
    refreshButtons();
    setStatus(label);
    const params = new URLSearchParams({ session: state.session || "", action: action });
    try {
      const token = await streamToken();
      if (token) params.set("token", token);
    } catch (err) {
      showError("The stream could not be authorised: " + err.message);
      finishStream("Failed.");
      return;
    }
    if ("WebSocket" in window) {
      const url = new URL("ws?" + params.toString() + "&format=json", window.location.href);
      url.protocol = window.location.protocol === "https:" ? "wss:" : "ws:";
      const ws = new WebSocket(url.toString());
      state.socket = ws;
      ws.onmessage = (e) => {
        let msg;
        try { msg = JSON.parse(e.data); } catch (err) { return; }
        handleEvent(msg, ctx);
      };
      ws.onclose = (e) => {
        if (!ctx.finished) {
          if (state.version !== null) els.story.value = state.versionText;
          showError("The connection closed before the story was finished (" + e.code + (e.reason ? ": " +
            e.reason : "") + ").");
          finishStream("Failed.");
        }
      };
    } else {
      const source = new EventSource("stream?" + params.toString());
      state.source = source;
      for (const type of ["delta", "done", "cancelled", "error"]) {
        source.addEventListener(type, (e) => { if (e.data) handleEvent(JSON.parse(e.data), ctx); });
      }
      source.onerror = () => {
        if (!ctx.finished) { showError("The stream was interrupted."); finishStream("Failed."); }
      };
    }
  }

  els.write.addEventListener("click", () => {
    if (state.streaming) return;
    startStream("story", state.hasStory ? "Rewriting the whole story…" : "Writing the story…");
  });

  els.stop.addEventListener("click", () => {
    if (state.socket && state.socket.readyState === WebSocket.OPEN) {
      state.socket.send(JSON.stringify({ type: "cancel" }));
    } else if (state.source) {
      post("api/cancel", {}).catch(() => {});
    }
    setStatus("Stopping…");
  });

  async function saveEdit() {
    const data = await post("api/edit", { text: els.story.value, parent: state.version });
    state.version = data.id;
    state.versionText = data.text;
    state.liked = !!data.feedback;
    await loadHistory(data.id);
    return data;
  }

  els.saveEdit.addEventListener("click", async () => {
    clearError();
    try {
      const v = await saveEdit();
      setStatus("Edit saved as version " + v.n + ".");
    } catch (err) {
      showError("The edit was not saved: " + err.message);
    } finally {
      refreshButtons();
    }
  });

  els.rewrite.addEventListener("click", async () => {
    clearError();
    const start = els.story.selectionStart;
    const end = els.story.selectionEnd;
    if (end <= start) { showError("Select the part of the story to rewrite first."); return; }
    try {
      if (dirty()) await saveEdit();
      const text = els.story.value;
      await post("api/rewrite", {
        version: state.version, textbefore: text.slice(0, start), textselected: text.slice(start, end),
        textafter: text.slice(end),
      });
      startStream("next", "Rewriting the selected part…");
    } catch (err) {
      showError("The part was not rewritten: " + err.message);
      refreshButtons();
    }
  });

  els.good.addEventListener("click", async () => {
    clearError();
    els.good.disabled = true;
    try {
      if (dirty()) await saveEdit();
      await post("api/feedback", { version: state.version, good: true });
      state.liked = true;
      setStatus("Story added to the next fine-tuning.");
      await loadHistory(state.version);
    } catch (err) {
      showError("The feedback was not saved: " + err.message);
    } finally {
      refreshButtons();
    }
  });

  for (const type of ["select", "keyup", "mouseup", "input", "focus", "blur"]) {
    els.story.addEventListener(type, refreshButtons);
  }
  document.addEventListener("selectionchange", refreshButtons);

  async function restore() {
    try {
      const s = await get("api/session");
      if (s.settings) {
        $("characters").value = s.settings.maincharacter;
        $("keywords").value = s.settings.keywords;
        $("maxwords").value = s.settings.maxnowords;
        $("childsafe").checked = !!s.settings.childsafe;
        $("twist").checked = !!s.settings.twist;
        for (const [id, key] of [["genre", "genre"], ["register", "registro"]]) {
          const select = $(id);
          const match = Array.from(select.options).find((o) => o.value.toLowerCase() === String(s.settings[key]).toLowerCase());
          if (match) select.value = match.value;
        }
        state.submitted = true;
        els.prompt.textContent = s.prompt || "";
      }
      const data = await loadHistory(s.current_version);
      const current = data && data.versions.find((v) => v.id === s.current_version);
      if (current) showVersion(current);
      setStatus(current ? "Restored version " + current.n + "." : els.status.textContent);
    } catch (err) {
      // 404: this tab's session was never written (nothing submitted yet), so there is nothing to restore
      if (err.status !== 404) showError("The saved session could not be restored: " + err.message);
    }
    refreshButtons();
  }

  checkSignIn().then((ok) => { if (ok) restore(); else refreshButtons(); });
})();
