// Talking to the server: GET /api/model, POST /api/chat, and streamed POST /v1/chat/completions.
// Every failure becomes an ApiError with the HTTP status (0 for network trouble) and the
// server's own message, so the page can explain it in plain words.

export class ApiError extends Error {
  constructor(status, message, { retryAfter = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

function headers(apiKey, extra = {}) {
  const h = { Accept: "application/json", ...extra };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

/** The most useful message in an error body, whatever shape the server gave it. */
export function errorMessage(body) {
  if (!body || typeof body !== "object") return "";
  if (typeof body.message === "string") return body.message;
  if (body.error && typeof body.error === "object" && typeof body.error.message === "string") {
    return body.error.message;
  }
  if (typeof body.error === "string") return body.error;
  const detail = body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((d) => {
        const where = Array.isArray(d.loc) ? d.loc.filter((p) => p !== "body").join(".") : "";
        return where ? `${where}: ${d.msg}` : String(d.msg ?? "");
      })
      .join("; ");
  }
  return "";
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's HTML page, an empty body): the status alone has to do
  }
  const retry = Number.parseFloat(response.headers.get("Retry-After") ?? "");
  return new ApiError(response.status, errorMessage(body) || response.statusText || "", {
    retryAfter: Number.isFinite(retry) ? retry : null,
  });
}

async function send(url, init) {
  try {
    return await fetch(url, init);
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError(0, "network");
  }
}

export async function fetchModel(apiKey) {
  const response = await send("/api/model", { headers: headers(apiKey) });
  if (!response.ok) throw await failure(response);
  return response.json();
}

/**
 * Build the /api/chat body from the message, history and settings. With the "default" strategy
 * only the message, history and length cap go: the server's defaults choose the search.
 */
export function chatBody(message, history, settings) {
  if (settings.strategy === "default") return { message, history, max_length: settings.max_length };
  const body = { message, history, strategy: settings.strategy, max_length: settings.max_length };
  if (settings.strategy === "beam") {
    body.beam_size = settings.beam_size;
    body.n_best = Math.min(settings.n_best, settings.beam_size);
  } else if (settings.strategy === "sample") {
    body.n_best = settings.n_best;
    body.temperature = settings.temperature;
    body.top_p = settings.top_p;
  }
  return body;
}

/** POST /api/chat: one complete reply with its candidates. */
export async function chat(body, { apiKey, signal }) {
  const response = await send("/api/chat", {
    method: "POST",
    headers: headers(apiKey, { "Content-Type": "application/json" }),
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await failure(response);
  return response.json();
}

/**
 * Whether a reply with these settings can be streamed token by token (one candidate only).
 * "default" cannot: the server picks its reply among candidates, so it arrives whole.
 */
export function canStream(settings) {
  return settings.strategy === "greedy" || (settings.strategy === "sample" && settings.n_best === 1);
}

/** The OpenAI-style body for a streamed reply. Temperature 0 means greedy on this server. */
export function streamBody(message, history, settings, model) {
  const body = {
    messages: [...history, { role: "user", content: message }],
    stream: true,
    n: 1,
    max_tokens: settings.max_length,
    temperature: settings.strategy === "greedy" ? 0 : settings.temperature,
    strategy: settings.strategy, // this server's extra field; other OpenAI-style servers ignore it
  };
  if (model) body.model = model;
  if (settings.strategy === "sample") body.top_p = settings.top_p;
  return body;
}

/**
 * POST /v1/chat/completions with stream: true; calls onToken(text) for every piece of text.
 * Resolves to {text, finishReason} once `data: [DONE]` arrives (or the stream ends).
 */
export async function streamChat(body, { apiKey, signal, onToken }) {
  const response = await send("/v1/chat/completions", {
    method: "POST",
    headers: headers(apiKey, { "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await failure(response);

  const type = response.headers.get("Content-Type") || "";
  if (!type.includes("text/event-stream")) {
    // A server that ignores `stream` answers with one JSON completion: show it whole.
    const data = await response.json();
    const text = data?.choices?.[0]?.message?.content ?? "";
    onToken(text);
    return { text, finishReason: data?.choices?.[0]?.finish_reason ?? null, usage: data?.usage ?? null };
  }

  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let text = "";
  let finishReason = null;
  let usage = null;

  const handleEvent = (raw) => {
    const data = raw
      .split(/\r?\n/)
      .filter((line) => line.startsWith("data:"))
      .map((line) => line.slice(5).replace(/^ /, ""))
      .join("\n");
    if (!data) return false;
    if (data.trim() === "[DONE]") return true;
    let chunk;
    try {
      chunk = JSON.parse(data);
    } catch {
      return false; // a keep-alive or a line we do not understand
    }
    if (chunk.error) {
      const status = Number(chunk.error.code) || Number(chunk.error.status) || 500;
      throw new ApiError(status, errorMessage(chunk));
    }
    const choice = chunk.choices?.[0];
    const piece = choice?.delta?.content;
    if (typeof piece === "string" && piece) {
      text += piece;
      onToken(piece);
    }
    if (choice?.finish_reason) finishReason = choice.finish_reason;
    if (chunk.usage) usage = chunk.usage;
    return false;
  };

  for (;;) {
    let result;
    try {
      result = await reader.read();
    } catch (err) {
      if (err && err.name === "AbortError") throw err;
      throw new ApiError(0, "network");
    }
    if (result.done) break;
    buffer += decoder.decode(result.value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) !== -1) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      if (handleEvent(event)) {
        reader.cancel().catch(() => {});
        return { text, finishReason, usage };
      }
    }
  }
  buffer += decoder.decode();
  if (buffer.trim()) handleEvent(buffer);
  return { text, finishReason, usage };
}
