// Persistence in localStorage: the conversation, the reply settings and the API key.
// Every read is defensive: storage may be full, disabled, or hold data from an older page.

const KEYS = {
  conversation: "chatbot.conversation.v1",
  settings: "chatbot.settings.v1",
  apiKey: "chatbot.apiKey",
};

// "default" sends no decoding fields: /api/chat then uses its own defaults (the setting judged best
// for reply quality: several samples, reranked). The others pick a search explicitly.
export const STRATEGIES = ["default", "greedy", "beam", "sample"];

// The server's bounds (app/schemas.py); it validates again. Temperature stays within what both
// /api/chat (0.01-5) and /v1/chat/completions (0-2) accept.
export const LIMITS = {
  beam_size: { min: 1, max: 16 },
  n_best: { min: 1, max: 16 },
  max_length: { min: 1, max: 256 },
  temperature: { min: 0.1, max: 2 },
  top_p: { min: 0.05, max: 1 },
};

export const DEFAULT_SETTINGS = Object.freeze({
  strategy: "default",
  beam_size: 5,
  n_best: 3,
  max_length: 40,
  temperature: 0.8,
  top_p: 0.9,
});

function read(key) {
  try {
    const raw = window.localStorage.getItem(key);
    return raw === null ? null : JSON.parse(raw);
  } catch {
    return null;
  }
}

function write(key, value) {
  try {
    if (value === null) window.localStorage.removeItem(key);
    else window.localStorage.setItem(key, JSON.stringify(value));
    return true;
  } catch {
    return false; // quota or disabled storage: the page still works, it just forgets on reload
  }
}

function clamp(value, { min, max }, fallback) {
  const n = Number(value);
  if (!Number.isFinite(n)) return fallback;
  return Math.min(max, Math.max(min, n));
}

export function normalizeSettings(raw) {
  const s = raw && typeof raw === "object" ? raw : {};
  const d = DEFAULT_SETTINGS;
  const out = {
    strategy: STRATEGIES.includes(s.strategy) ? s.strategy : d.strategy,
    beam_size: Math.round(clamp(s.beam_size, LIMITS.beam_size, d.beam_size)),
    n_best: Math.round(clamp(s.n_best, LIMITS.n_best, d.n_best)),
    max_length: Math.round(clamp(s.max_length, LIMITS.max_length, d.max_length)),
    temperature: clamp(s.temperature, LIMITS.temperature, d.temperature),
    top_p: clamp(s.top_p, LIMITS.top_p, d.top_p),
  };
  // Beam search cannot return more finished hypotheses than it keeps beams.
  if (out.strategy === "beam") out.n_best = Math.min(out.n_best, out.beam_size);
  return out;
}

export function loadSettings() {
  return normalizeSettings(read(KEYS.settings));
}

export function saveSettings(settings) {
  write(KEYS.settings, normalizeSettings(settings));
}

function validMessage(m) {
  return m && typeof m === "object" && (m.role === "user" || m.role === "assistant")
    && typeof m.content === "string";
}

/** The stored conversation: a list of {role, content, ...extras}. */
export function loadConversation() {
  const raw = read(KEYS.conversation);
  const list = raw && Array.isArray(raw.messages) ? raw.messages : [];
  return list.filter(validMessage);
}

export function saveConversation(messages) {
  write(KEYS.conversation, { version: 1, messages });
}

export function clearConversation() {
  write(KEYS.conversation, null);
}

export function loadApiKey() {
  const key = read(KEYS.apiKey);
  return typeof key === "string" ? key : "";
}

export function saveApiKey(key) {
  write(KEYS.apiKey, key ? key : null);
}
