// Talking to the server: the API key, JSON requests, OpenAI error envelopes, retries
// for 429/503 (honouring Retry-After) and the server-sent events of a streamed chat.

const KEY_NAME = "ggufserve.apiKey";
const MAX_RETRIES = 3;
const MAX_RETRY_WAIT_S = 30;

/** An HTTP error (status > 0) or an error event inside a stream (status 0). */
export class ApiError extends Error {
  constructor(status, message, retryAfterS = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.retryAfterS = retryAfterS;
  }
}

export function getKey() {
  return sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME) || "";
}

/** Keep the key for this tab only, or on this device when `remember`. */
export function setKey(key, remember) {
  forgetKey();
  (remember ? localStorage : sessionStorage).setItem(KEY_NAME, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_NAME);
  localStorage.removeItem(KEY_NAME);
}

/** fetch() on this origin only; the key never leaves it. */
async function request(path, { method = "GET", body, signal } = {}) {
  const url = new URL(path, location.origin);
  if (url.origin !== location.origin) throw new Error(`refusing cross-origin request to ${url}`);
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const key = getKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(url, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    credentials: "same-origin",
  });
  if (!response.ok) throw await errorOf(response);
  return response;
}

/** The OpenAI envelope's error.message (or the status text) as an ApiError. */
async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") message = body.error.message;
  } catch {
    // not JSON: keep the status line
  }
  const header = Number.parseFloat(response.headers.get("Retry-After") ?? "");
  return new ApiError(response.status, message, Number.isFinite(header) ? header : null);
}

function sleep(seconds, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, seconds * 1000);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(new DOMException("aborted", "AbortError"));
    }, { once: true });
  });
}

/** Run `attempt()`; on 429/503 wait Retry-After (else 1, 2, 4 s) and try again, calling
 * `onWait(seconds, error)` first so the page can say so. */
async function withRetry(attempt, signal, onWait) {
  for (let tries = 0; ; tries++) {
    try {
      return await attempt();
    } catch (error) {
      const retryable = error instanceof ApiError && (error.status === 429 || error.status === 503);
      if (!retryable || tries >= MAX_RETRIES) throw error;
      const wait = Math.min(error.retryAfterS ?? 2 ** tries, MAX_RETRY_WAIT_S);
      onWait?.(wait, error);
      await sleep(wait, signal);
    }
  }
}

export async function listModels() {
  const response = await request("/v1/models");
  return (await response.json()).data;
}

/**
 * POST /v1/chat/completions with stream: true and yield each parsed chunk.
 * Throws ApiError for an HTTP error (after retries) or an error event in the stream;
 * aborting `signal` cancels the request (the server then stops generating).
 */
export async function* streamChat(body, { signal, onWait } = {}) {
  const response = await withRetry(
    () => request("/v1/chat/completions", { method: "POST", body, signal }),
    signal,
    onWait,
  );
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(0, chunk.error.message ?? "generation failed");
        yield chunk;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}
