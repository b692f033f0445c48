// Conversations and settings kept in localStorage (this browser only; nothing is sent
// anywhere but the chat request itself).
//
// A conversation: {id, title, system, model, createdAt, updatedAt, messages}; a message:
// {role: "user"|"assistant", content, images: [dataURI], reasoning, toolCalls:
//  [{id, name, arguments}], stats: {tokens, ttftS, tokPerS}, error, stopped}.

const CONVERSATIONS = "ggufserve.conversations";
const CURRENT = "ggufserve.current";
const SETTINGS = "ggufserve.settings";
export const NEW_TITLE = "New chat";

function read(name, fallback) {
  try {
    return JSON.parse(localStorage.getItem(name) ?? "null") ?? fallback;
  } catch {
    return fallback;
  }
}

/** Raises the browser's QuotaExceededError when storage is full (the caller says so). */
function write(name, value) {
  localStorage.setItem(name, JSON.stringify(value));
}

export function loadConversations() {
  const list = read(CONVERSATIONS, []);
  return Array.isArray(list) ? list.filter((c) => c && c.id && Array.isArray(c.messages)) : [];
}

export function saveConversations(conversations) {
  write(CONVERSATIONS, conversations);
}

export function loadCurrentId() {
  return localStorage.getItem(CURRENT);
}

export function saveCurrentId(id) {
  localStorage.setItem(CURRENT, id);
}

export function newConversation() {
  const now = Date.now();
  return {
    id: crypto.randomUUID?.() ?? `${now}-${Math.random().toString(36).slice(2)}`,
    title: NEW_TITLE,
    system: "",
    model: "",
    createdAt: now,
    updatedAt: now,
    messages: [],
  };
}

export function loadSettings() {
  return { temperature: 0.7, top_p: 0.95, max_tokens: 512, model: "", ...read(SETTINGS, {}) };
}

export function saveSettings(settings) {
  write(SETTINGS, settings);
}

/** Offer the conversation as a JSON file download. */
export function exportConversation(conversation) {
  const blob = new Blob([JSON.stringify(conversation, null, 2)], { type: "application/json" });
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  const name = conversation.title.replace(/[^\w.-]+/g, "_").slice(0, 60) || "conversation";
  link.href = url;
  link.download = `${name}.json`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
