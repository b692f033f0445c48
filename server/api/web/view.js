// One chat message as DOM: images, reasoning (collapsible), tool-call cards, the text
// (Markdown for replies, plain text for the user's), the stats line and any error.
// Everything goes through textContent / renderMarkdown; nothing is parsed as HTML.

import { renderMarkdown } from "./markdown.js";

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** "12 tokens · first token 0.21 s · 35.2 tok/s" */
export function statsText(stats) {
  const parts = [`${stats.tokens} token${stats.tokens === 1 ? "" : "s"}`];
  if (stats.ttftS != null) parts.push(`first token ${stats.ttftS.toFixed(2)} s`);
  if (stats.tokPerS != null) parts.push(`${stats.tokPerS.toFixed(1)} tok/s`);
  return parts.join(" · ");
}

function reasoningBlock(message, wasOpen) {
  const details = el("details", "reasoning");
  details.open = wasOpen;
  details.append(el("summary", null, message.streaming && !message.content ? "Thinking…" : "Reasoning"));
  details.append(el("div", "reasoning-text", message.reasoning));
  return details;
}

function toolCallCards(toolCalls) {
  const box = el("div", "tool-calls");
  for (const call of toolCalls) {
    const card = el("div", "tool-call");
    card.setAttribute("role", "group");
    card.setAttribute("aria-label", `Tool call ${call.name || ""}`.trim());
    card.append(el("div", "tool-name", `Tool call: ${call.name || "(unnamed)"}`));
    card.append(el("pre", "tool-args", call.arguments || ""));
    box.append(card);
  }
  return box;
}

function imageStrip(images) {
  const strip = el("div", "msg-images");
  images.forEach((uri, index) => {
    const img = el("img");
    img.src = uri; // the user's own data: URI
    img.alt = `attached image ${index + 1}`;
    strip.append(img);
  });
  return strip;
}

/** The <article> for `message`; `previous` (the element it replaces, if any) keeps its
 * reasoning block's open/closed state. */
export function renderMessage(message, modelName, previous = null) {
  const article = el("article", `msg ${message.role}`);
  article.dataset.id = message.id;
  const who = message.role === "user" ? "You" : modelName || "Assistant";
  article.setAttribute("aria-label", message.role === "user" ? "Your message" : `Reply from ${who}`);
  article.append(el("div", "role", who));
  if (message.images?.length) article.append(imageStrip(message.images));
  if (message.reasoning) {
    const wasOpen = previous?.querySelector("details.reasoning")?.open ?? false;
    article.append(reasoningBlock(message, wasOpen));
  }
  if (message.toolCalls?.length) article.append(toolCallCards(message.toolCalls));
  if (message.role === "user") {
    article.append(el("div", "content plain", message.content));
  } else {
    const content = el("div", "content markdown");
    content.append(renderMarkdown(message.content || ""));
    if (message.streaming) content.append(el("span", "cursor", "▍"));
    article.append(content);
  }
  if (message.stats) {
    const line = el("div", "stats", statsText(message.stats));
    if (message.stopped) line.textContent += " · stopped";
    article.append(line);
  } else if (message.stopped) {
    article.append(el("div", "stats", "stopped"));
  }
  if (message.error) article.append(el("div", "msg-error", message.error));
  return article;
}

/** The sidebar's <li> per conversation: a button opening it and one deleting it. */
export function conversationItems(conversations, currentId, onOpen, onDelete) {
  return conversations.map((conversation) => {
    const item = el("li");
    const open = el("button", "open", conversation.title);
    open.type = "button";
    if (conversation.id === currentId) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => onOpen(conversation.id));
    const remove = el("button", "delete", "×");
    remove.type = "button";
    remove.setAttribute("aria-label", `Delete conversation ${conversation.title}`);
    remove.addEventListener("click", () => onDelete(conversation.id));
    item.append(open, remove);
    return item;
  });
}
