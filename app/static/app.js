// The chat page controller: wires the form, the settings panel and the message list together.
// Modules: store.js (localStorage), api.js (HTTP + streaming), view.js (DOM, text only).

import { ApiError, canStream, chat, chatBody, fetchModel, streamBody, streamChat } from "./api.js";
import {
  DEFAULT_SETTINGS, LIMITS, clearConversation, loadApiKey, loadConversation, loadSettings,
  normalizeSettings, saveApiKey, saveConversation, saveSettings,
} from "./store.js";
import { errorItem, messageItem, startStreaming, typingItem, updateMeta } from "./view.js";

// The model only reads the last few turns; sending a bounded history keeps requests small.
const HISTORY_LIMIT = 20;
const STRATEGY_HINTS = {
  default: "The server's default, the setting judged best for reply quality: it searches several "
    + "candidate replies and picks the best by its reranking score; the reply is shown whole when ready.",
  greedy: "Picks the most likely word each step. Fast, and the reply streams in as it is written.",
  beam: "Keeps several partial replies and returns the best ones, with their scores.",
  sample: "Draws words at random. Higher temperature gives more surprising replies.",
};

const $ = (id) => document.getElementById(id);

const ui = {
  messages: $("messages"),
  chat: $("chat"),
  empty: $("empty-state"),
  composer: $("composer"),
  input: $("composer-input"),
  send: $("send"),
  newChat: $("new-chat"),
  modelName: $("model-name"),
  statusDot: $("status-dot"),
  settingsToggle: $("settings-toggle"),
  settingsPanel: $("settings-panel"),
  settingsForm: $("settings-form"),
  settingsReset: $("settings-reset"),
  strategy: $("strategy"),
  strategyHint: $("strategy-hint"),
  beamSize: $("beam-size"),
  nBest: $("n-best"),
  maxLength: $("max-length"),
  temperature: $("temperature"),
  temperatureValue: $("temperature-value"),
  topP: $("top-p"),
  topPValue: $("top-p-value"),
  apiKey: $("api-key"),
};

const state = {
  messages: loadConversation(),
  settings: loadSettings(),
  apiKey: loadApiKey(),
  model: "",
  busy: null, // {controller} while a reply is on its way
  streamingUnavailable: false,
};

// ---------------------------------------------------------------- conversation view

function nearBottom() {
  const c = ui.chat;
  return c.scrollHeight - c.scrollTop - c.clientHeight < 120;
}

function scrollToEnd(force = false) {
  if (force || nearBottom()) ui.chat.scrollTop = ui.chat.scrollHeight;
}

function updateEmptyState() {
  const empty = ui.messages.children.length === 0;
  ui.empty.hidden = !empty;
  ui.messages.hidden = empty;
  document.body.classList.toggle("has-messages", !empty);
}

function renderAll() {
  ui.messages.replaceChildren(...state.messages.map(messageItem));
  updateEmptyState();
  scrollToEnd(true);
}

function append(node) {
  const stick = nearBottom();
  ui.messages.append(node);
  updateEmptyState();
  scrollToEnd(stick);
  return node;
}

/** Swap a node, keeping the view pinned to the bottom if it was there before the swap. */
function replace(old, node, { force = false } = {}) {
  const stick = force || nearBottom();
  old.replaceWith(node);
  scrollToEnd(stick);
  return node;
}

function removeErrorCards() {
  ui.messages.querySelectorAll(".msg-error").forEach((n) => n.remove());
}

function persist() {
  saveConversation(state.messages);
}

/** History for the server: earlier turns that got an answer, as {role, content}. */
function historyBefore(index) {
  return state.messages
    .slice(0, index)
    .filter((m) => !m.failed)
    .map((m) => ({ role: m.role, content: m.content }))
    .slice(-HISTORY_LIMIT);
}

// ---------------------------------------------------------------- busy state

// On phones, focusing the box on load would throw the keyboard over the page before anyone asked.
const COARSE_POINTER = window.matchMedia("(pointer: coarse)").matches;

function setBusy(controller, { focus = true } = {}) {
  state.busy = controller ? { controller } : null;
  const busy = Boolean(controller);
  ui.input.disabled = busy;
  ui.composer.classList.toggle("is-busy", busy);
  ui.send.setAttribute("aria-label", busy ? "Stop the reply" : "Send");
  ui.send.title = busy ? "Stop" : "Send (Enter)";
  ui.messages.setAttribute("aria-busy", busy ? "true" : "false");
  document.body.classList.toggle("is-waiting", busy);
  if (!busy) {
    if (focus) ui.input.focus({ preventScroll: true });
    updateSendEnabled();
  } else {
    ui.send.disabled = false;
  }
}

function updateSendEnabled() {
  if (!state.busy) ui.send.disabled = ui.input.value.trim().length === 0;
}

// ---------------------------------------------------------------- sending

async function requestReply(userIndex, userItem, placeholder) {
  const conversation = state.messages; // "New chat" swaps this array: late answers are dropped
  const user = conversation[userIndex];
  const history = historyBefore(userIndex);
  const settings = state.settings;
  const controller = new AbortController();
  setBusy(controller);
  const started = performance.now();
  let textNode = null;
  let streamed = "";
  let focusAfter = null;

  try {
    let reply;
    if (canStream(settings) && !state.streamingUnavailable) {
      try {
        const result = await streamChat(streamBody(user.content, history, settings, state.model), {
          apiKey: state.apiKey,
          signal: controller.signal,
          onToken: (piece) => {
            const stick = nearBottom();
            if (!textNode) textNode = startStreaming(placeholder);
            streamed += piece;
            textNode.textContent = streamed;
            scrollToEnd(stick);
          },
        });
        reply = {
          content: result.text,
          latency_ms: performance.now() - started,
          strategy: settings.strategy,
        };
      } catch (err) {
        // A server without the streaming endpoint still has /api/chat.
        if (!(err instanceof ApiError) || (err.status !== 404 && err.status !== 405)) throw err;
        state.streamingUnavailable = true;
        reply = null;
      }
    }
    if (!reply) {
      const data = await chat(chatBody(user.content, history, settings), {
        apiKey: state.apiKey,
        signal: controller.signal,
      });
      reply = {
        content: String(data.reply ?? ""),
        candidates: Array.isArray(data.candidates) ? data.candidates : [],
        latency_ms: Number.isFinite(data.latency_ms) ? data.latency_ms : performance.now() - started,
        strategy: data.strategy || settings.strategy,
      };
    }
    if (state.messages !== conversation) return;
    delete user.failed;
    const message = { role: "assistant", ...reply };
    state.messages.push(message);
    persist();
    replace(placeholder, messageItem(message));
    updateMeta(userItem, user);
  } catch (err) {
    if (state.messages !== conversation) return;
    if (err && err.name === "AbortError") {
      handleStopped(user, userItem, placeholder, streamed, started);
    } else {
      focusAfter = handleError(err, user, userItem, placeholder);
    }
  } finally {
    setBusy(null);
    if (focusAfter) focusAfter.focus();
  }
}

function handleStopped(user, userItem, placeholder, streamed, started) {
  if (streamed) {
    const message = {
      role: "assistant", content: streamed, stopped: true,
      latency_ms: performance.now() - started, strategy: state.settings.strategy,
    };
    delete user.failed;
    state.messages.push(message);
    replace(placeholder, messageItem(message));
  } else {
    user.failed = true;
    placeholder.remove();
  }
  persist();
  updateMeta(userItem, user);
}

function handleError(err, user, userItem, placeholder) {
  const error = err instanceof ApiError ? err : new ApiError(0, String(err?.message ?? err));
  if (!(err instanceof ApiError)) console.error(err); // a bug in the page, not a server answer
  error.hadKey = Boolean(state.apiKey);
  user.failed = true;
  persist();
  updateMeta(userItem, user);
  const card = errorItem(error, {
    onRetry: () => retryLast(),
    onKey: (key) => {
      setApiKey(key);
      retryLast();
    },
  });
  replace(placeholder, card, { force: true });
  // The key field needs the user's attention; otherwise typing goes on in the message box.
  return error.status === 401 ? card.querySelector("input") : null;
}

function sendMessage(text) {
  const content = text.trim();
  if (!content || state.busy) return;
  removeErrorCards();
  const message = { role: "user", content };
  state.messages.push(message);
  persist();
  const userItem = append(messageItem(message));
  ui.input.value = "";
  autoGrow();
  const placeholder = append(typingItem());
  scrollToEnd(true);
  requestReply(state.messages.length - 1, userItem, placeholder);
}

function retryLast() {
  if (state.busy) return;
  const index = state.messages.length - 1;
  const last = state.messages[index];
  if (!last || last.role !== "user") return;
  removeErrorCards();
  const userItem = ui.messages.lastElementChild;
  const placeholder = append(typingItem());
  scrollToEnd(true);
  requestReply(index, userItem, placeholder);
}

function newChat() {
  if (state.busy) state.busy.controller.abort();
  state.messages = [];
  clearConversation();
  renderAll();
  ui.input.value = "";
  autoGrow();
  updateSendEnabled();
  ui.input.focus();
}

// ---------------------------------------------------------------- composer

function autoGrow() {
  // CSSOM writes like this are allowed by a CSP without 'unsafe-inline' (only style attributes are not).
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 200)}px`;
}

ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !event.altKey && !event.ctrlKey) {
    event.preventDefault();
    sendMessage(ui.input.value);
  }
});
ui.input.addEventListener("input", () => {
  autoGrow();
  updateSendEnabled();
});
ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  if (state.busy) state.busy.controller.abort();
  else sendMessage(ui.input.value);
});
ui.newChat.addEventListener("click", newChat);
ui.empty.addEventListener("click", (event) => {
  const chip = event.target.closest("[data-suggestion]");
  if (chip) sendMessage(chip.dataset.suggestion);
});

// ---------------------------------------------------------------- settings

function showSettings() {
  const s = state.settings;
  ui.strategy.value = s.strategy;
  ui.beamSize.value = String(s.beam_size);
  ui.nBest.value = String(s.n_best);
  ui.maxLength.value = String(s.max_length);
  ui.temperature.value = String(s.temperature);
  ui.topP.value = String(s.top_p);
  ui.temperatureValue.textContent = s.temperature.toFixed(2);
  ui.topPValue.textContent = s.top_p.toFixed(2);
  ui.strategyHint.textContent = STRATEGY_HINTS[s.strategy];
  ui.nBest.max = String(s.strategy === "beam" ? s.beam_size : LIMITS.n_best.max);
  ui.apiKey.value = state.apiKey;
  for (const field of ui.settingsForm.querySelectorAll("[data-for]")) {
    field.hidden = !field.dataset.for.split(" ").includes(s.strategy);
  }
}

function readSettings() {
  return normalizeSettings({
    strategy: ui.strategy.value,
    beam_size: ui.beamSize.value,
    n_best: ui.nBest.value,
    max_length: ui.maxLength.value,
    temperature: ui.temperature.value,
    top_p: ui.topP.value,
  });
}

function applySettings({ rewrite }) {
  state.settings = readSettings();
  saveSettings(state.settings);
  if (rewrite) showSettings();
  else {
    // While typing a number, only refresh what depends on it (rewriting the field would fight the user).
    ui.temperatureValue.textContent = state.settings.temperature.toFixed(2);
    ui.topPValue.textContent = state.settings.top_p.toFixed(2);
  }
}

function setApiKey(key) {
  state.apiKey = key.trim();
  saveApiKey(state.apiKey);
  ui.apiKey.value = state.apiKey;
  loadModel();
}

function toggleSettings(open) {
  const show = open ?? ui.settingsPanel.hidden;
  ui.settingsPanel.hidden = !show;
  ui.settingsToggle.setAttribute("aria-expanded", String(show));
  if (show) ui.strategy.focus();
}

ui.settingsToggle.addEventListener("click", () => toggleSettings());
ui.settingsForm.addEventListener("input", (event) => {
  if (event.target === ui.apiKey) return;
  applySettings({ rewrite: event.target === ui.strategy });
});
ui.settingsForm.addEventListener("change", (event) => {
  if (event.target === ui.apiKey) setApiKey(ui.apiKey.value);
  else applySettings({ rewrite: true });
});
ui.settingsForm.addEventListener("submit", (event) => {
  event.preventDefault();
  setApiKey(ui.apiKey.value);
  applySettings({ rewrite: true });
  toggleSettings(false);
  ui.settingsToggle.focus();
});
ui.settingsReset.addEventListener("click", () => {
  state.settings = normalizeSettings(DEFAULT_SETTINGS);
  saveSettings(state.settings);
  showSettings();
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && !ui.settingsPanel.hidden) {
    toggleSettings(false);
    ui.settingsToggle.focus();
  }
});

// ---------------------------------------------------------------- model name

let modelRetry = null;

async function loadModel() {
  clearTimeout(modelRetry);
  try {
    const info = await fetchModel(state.apiKey);
    state.model = typeof info.name === "string" ? info.name : "";
    ui.modelName.textContent = state.model || "Model loaded";
    const params = Number(info.parameters ?? info.num_parameters);
    ui.modelName.title = Number.isFinite(params) && params > 0
      ? `${state.model} · ${(params / 1e6).toFixed(params < 1e6 ? 2 : 1)}M parameters`
      : state.model;
    ui.statusDot.dataset.state = "ready";
  } catch (err) {
    const status = err instanceof ApiError ? err.status : 0;
    ui.statusDot.dataset.state = status === 401 ? "locked" : "down";
    ui.modelName.textContent = status === 401 ? "API key needed"
      : status === 503 ? "Model loading…" : "Server unreachable";
    ui.modelName.title = "";
    if (status !== 401) modelRetry = setTimeout(loadModel, 5000);
  }
}

// ---------------------------------------------------------------- start

showSettings();
renderAll();
autoGrow();
updateSendEnabled();
setBusy(null, { focus: !COARSE_POINTER });
loadModel();
document.documentElement.dataset.ready = "true";
