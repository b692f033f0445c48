// Conversations ↔ the OpenAI chat wire format: the messages of a request, and a
// streamed reply read into a message together with its stats.

/** The request's `messages`: the system prompt, then each turn; a user turn with images
 * becomes content parts (images first, then the text). */
export function requestMessages(conversation) {
  const messages = conversation.system ? [{ role: "system", content: conversation.system }] : [];
  for (const m of conversation.messages) {
    if (m.streaming) continue;
    if (m.role === "user" && m.images?.length) {
      const parts = m.images.map((url) => ({ type: "image_url", image_url: { url } }));
      if (m.content) parts.push({ type: "text", text: m.content });
      messages.push({ role: "user", content: parts });
    } else {
      messages.push({ role: m.role, content: m.content ?? "" });
    }
  }
  return messages;
}

/** Tool-call deltas arrive in pieces keyed by index: the name, then argument fragments. */
function mergeToolCalls(calls, deltas) {
  for (const delta of deltas) {
    const call = (calls[delta.index ?? 0] ??= { id: "", name: "", arguments: "" });
    if (delta.id) call.id = delta.id;
    if (delta.function?.name) call.name += delta.function.name;
    if (delta.function?.arguments) call.arguments += delta.function.arguments;
  }
}

/**
 * Read the chunks of a streamed chat completion into `reply` (content, reasoning,
 * toolCalls, finishReason), calling `onUpdate()` after each chunk. `reply.stats` is set
 * when the stream ends, also when it fails or is aborted (the error is rethrown):
 * tokens (the usage chunk's completion_tokens, else the deltas counted), time to first
 * token, and decode speed (tokens after the first over the time after the first).
 */
export async function readReply(chunks, reply, onUpdate) {
  const started = performance.now();
  let first = null;
  let deltas = 0;
  let usage = null;
  try {
    for await (const chunk of chunks) {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices ?? []) {
        const delta = choice.delta ?? {};
        if (delta.content || delta.reasoning_content || delta.tool_calls) {
          first ??= performance.now();
          deltas++;
        }
        if (delta.content) reply.content += delta.content;
        if (delta.reasoning_content) reply.reasoning += delta.reasoning_content;
        if (delta.tool_calls) mergeToolCalls(reply.toolCalls, delta.tool_calls);
        if (choice.finish_reason) reply.finishReason = choice.finish_reason;
      }
      onUpdate();
    }
  } finally {
    const end = performance.now();
    const tokens = usage?.completion_tokens ?? deltas;
    const decodeS = first === null ? 0 : (end - first) / 1000;
    reply.stats = {
      tokens,
      promptTokens: usage?.prompt_tokens ?? null,
      ttftS: first === null ? null : (first - started) / 1000,
      tokPerS: tokens > 1 && decodeS > 0 ? (tokens - 1) / decodeS : null,
    };
  }
}
