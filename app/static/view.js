// Building the DOM for messages, the typing indicator and error cards.
// Everything typed by the user or sent by the server goes in through textContent: never as HTML.

// The meta line names the search the server reports; "Recommended" only if a reply lacks one.
const STRATEGY_NAMES = { default: "Recommended", greedy: "Greedy", beam: "Beam", sample: "Sampling" };

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function formatLatency(ms) {
  if (!Number.isFinite(ms)) return "";
  if (ms < 1000) return `${Math.max(1, Math.round(ms))} ms`;
  return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
}

export function formatScore(score) {
  return Number.isFinite(score) ? score.toFixed(3) : "–";
}

function fillText(node, content) {
  node.textContent = content;
  node.classList.toggle("is-empty", content.length === 0);
}

/** A user or bot message as a list item. */
export function messageItem(message) {
  const isUser = message.role === "user";
  const li = el("li", `msg ${isUser ? "msg-user" : "msg-bot"}`);
  li.dataset.role = message.role;

  const bubble = el("div", "bubble");
  bubble.append(el("span", "visually-hidden", isUser ? "You said: " : "Bot replied: "));
  const text = el("p", "text");
  fillText(text, message.content);
  bubble.append(text);
  li.append(bubble);

  const meta = el("div", "meta");
  li.append(meta);
  updateMeta(li, message);

  if (!isUser && Array.isArray(message.candidates) && message.candidates.length > 1) {
    li.append(candidateList(message));
  }
  return li;
}

/** Set the small line under a message: latency and strategy, or "not sent". */
export function updateMeta(li, message) {
  const meta = li.querySelector(".meta");
  meta.replaceChildren();
  li.classList.toggle("is-failed", Boolean(message.failed));
  if (message.role === "user") {
    if (message.failed) meta.append(el("span", "meta-warn", "Not answered"));
    return;
  }
  const parts = [];
  if (message.strategy) parts.push(STRATEGY_NAMES[message.strategy] ?? message.strategy);
  if (message.stopped) parts.push("stopped");
  if (Number.isFinite(message.latency_ms)) {
    const time = el("span", "latency", formatLatency(message.latency_ms));
    time.title = "Time to the complete reply";
    parts.forEach((p) => meta.append(el("span", "meta-part", p)));
    meta.append(time);
  } else {
    parts.forEach((p) => meta.append(el("span", "meta-part", p)));
  }
}

function candidateList(message) {
  const details = el("details", "candidates");
  const summary = el("summary", "candidates-summary");
  summary.append(el("span", "", `${message.candidates.length} candidates`));
  summary.append(el("span", "candidates-hint", "with scores"));
  details.append(summary);

  const list = el("ol", "candidate-list");
  let chosenMarked = false;
  for (const candidate of message.candidates) {
    const item = el("li", "candidate");
    const text = el("span", "candidate-text");
    fillText(text, String(candidate.text ?? ""));
    const score = el("span", "candidate-score", formatScore(Number(candidate.score)));
    score.title = "Score (log-probability, length-normalised; higher is better)";
    item.append(text, score);
    if (!chosenMarked && candidate.text === message.content) {
      item.classList.add("is-chosen");
      item.append(el("span", "visually-hidden", " (shown reply)"));
      chosenMarked = true;
    }
    list.append(item);
  }
  details.append(list);
  return details;
}

/** The bot's placeholder while waiting: three bouncing dots, then streamed text. */
export function typingItem() {
  const li = el("li", "msg msg-bot is-typing");
  li.dataset.role = "assistant";
  const bubble = el("div", "bubble");
  const dots = el("span", "typing");
  dots.append(el("span", "dot"), el("span", "dot"), el("span", "dot"));
  dots.append(el("span", "visually-hidden", "The bot is typing…"));
  bubble.append(dots);
  li.append(bubble, el("div", "meta"));
  return li;
}

/** Switch a typing placeholder to streaming text (first token arrived). */
export function startStreaming(li) {
  li.classList.remove("is-typing");
  li.classList.add("is-streaming");
  const bubble = li.querySelector(".bubble");
  const text = el("p", "text");
  bubble.replaceChildren(el("span", "visually-hidden", "Bot replied: "), text);
  return text;
}

const ERROR_TEXT = {
  0: ["Can't reach the server", "Check that the server is running and your connection works, then try again."],
  401: ["API key needed", "This server only answers requests that carry its API key. Enter it below."],
  403: ["Not allowed", "The server refused this request."],
  413: ["Message too long", "That message (with the conversation before it) is more than the server accepts. Try a shorter one or start a new chat."],
  422: ["The server could not use this request", ""],
  429: ["The server is busy", "Too many people are chatting right now. Wait a moment and try again."],
  503: ["The model is not ready yet", "The server is still starting or is overloaded. Try again in a few seconds."],
  504: ["The reply took too long", "The server gave up waiting for the model. Try again, or lower the max length."],
};

/** Plain words for an error: [title, explanation, server detail]. */
export function describeError(error) {
  const status = error?.status ?? 0;
  const known = ERROR_TEXT[status];
  const detail = error?.message && error.message !== "network" ? error.message : "";
  if (known) {
    let [title, text] = known;
    if (status === 429 && Number.isFinite(error.retryAfter)) {
      text = `Too many people are chatting right now. Try again in about ${Math.ceil(error.retryAfter)} s.`;
    }
    if (status === 401 && error.hadKey) {
      title = "That API key was not accepted";
      text = "Check the key and enter it again.";
    }
    if (!text) text = detail || "Please check the settings and try again.";
    return { title, text, detail: text === detail ? "" : detail };
  }
  if (status >= 500) {
    return { title: "The server ran into a problem", text: "Something went wrong on the server. Try again.", detail };
  }
  return { title: `Request failed (${status})`, text: detail || "Something went wrong.", detail: "" };
}

export function isRetryable(status) {
  return status === 0 || status === 429 || status === 503 || status === 504 || status >= 500;
}

/**
 * An error card. `actions` has onRetry() and onKey(key); the 401 card gets a key field.
 */
export function errorItem(error, { onRetry, onKey }) {
  const status = error?.status ?? 0;
  const { title, text, detail } = describeError(error);
  const li = el("li", "msg msg-error");
  li.dataset.status = String(status);
  const card = el("div", "error-card");
  card.setAttribute("role", "alert");
  card.append(el("p", "error-title", title), el("p", "error-text", text));
  if (detail) card.append(el("p", "error-detail", `Server said: ${detail}`));

  if (status === 401) {
    const form = el("form", "key-form");
    const id = `key-${Date.now()}`;
    const label = el("label", "key-label", "API key");
    label.htmlFor = id;
    const input = el("input", "key-input");
    input.id = id;
    input.type = "password";
    input.autocomplete = "off";
    input.spellcheck = false;
    input.required = true;
    const button = el("button", "btn btn-primary", "Save key and retry");
    button.type = "submit";
    form.append(label, input, button);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) {
        input.focus();
        return;
      }
      onKey(key);
    });
    card.append(form);
  } else if (isRetryable(status)) {
    const button = el("button", "btn btn-primary btn-retry", "Try again");
    button.type = "button";
    button.addEventListener("click", () => onRetry());
    card.append(button);
  }
  li.append(card);
  return li;
}
