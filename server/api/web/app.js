// The chat page's controller: conversations, the model picker, sending and streaming
// replies, attachments, the API key and error banners. See docs/api.md, "The web chat page".

import { ApiError, forgetKey, getKey, listModels, setKey, streamChat } from "./api.js";
import { readReply, requestMessages } from "./chat.js";
import { isImage, toDataURI } from "./images.js";
import * as store from "./store.js";
import { conversationItems, renderMessage } from "./view.js";

const $ = (id) => document.getElementById(id);
const ui = {
  sidebar: $("sidebar"), menu: $("menu"), newChat: $("new-chat"), list: $("conversations"),
  system: $("system"), temperature: $("temperature"), topP: $("top-p"),
  maxTokens: $("max-tokens"), exportButton: $("export"), forgetKey: $("forget-key"),
  title: $("title"), model: $("model"), banner: $("banner"), bannerText: $("banner-text"),
  bannerClose: $("banner-close"), keyForm: $("key-form"), keyInput: $("api-key"),
  rememberKey: $("remember-key"), messages: $("messages"), composer: $("composer"),
  attachments: $("attachments"), attach: $("attach"), fileInput: $("file-input"),
  input: $("input"), send: $("send"), stop: $("stop"),
};

const state = {
  conversations: store.loadConversations(),
  currentId: store.loadCurrentId(),
  settings: store.loadSettings(),
  models: [],
  pending: [], // data URIs attached to the next message
  controller: null, // AbortController of the reply being streamed
  streamingIn: null, // id of the conversation that reply belongs to
  afterAuth: null, // what to retry once an API key is entered
  adding: Promise.resolve(), // images still being read / downscaled, in order
};

// ---- helpers -------------------------------------------------------------------------

const current = () => state.conversations.find((c) => c.id === state.currentId);
const card = (id) => state.models.find((m) => m.id === id);
const isVision = (id) => Boolean(card(id)?.capabilities?.includes("vision"));
const messageId = () => `m${Date.now().toString(36)}${Math.random().toString(36).slice(2, 7)}`;

function showBanner(text) {
  ui.bannerText.textContent = text;
  ui.banner.hidden = false;
}

function hideBanner() {
  ui.banner.hidden = true;
}

function persist() {
  try {
    store.saveConversations(state.conversations);
    store.saveCurrentId(state.currentId);
    store.saveSettings(state.settings);
  } catch {
    showBanner("Could not save: this browser's storage is full. Delete or export old conversations.");
  }
}

function describe(error) {
  if (error instanceof ApiError) return error.status ? `Error ${error.status}: ${error.message}` : error.message;
  return `Cannot reach the server: ${error.message}`;
}

// ---- sidebar and conversation --------------------------------------------------------

function renderSidebar() {
  const sorted = [...state.conversations].sort((a, b) => b.updatedAt - a.updatedAt);
  ui.list.replaceChildren(
    ...conversationItems(sorted, state.currentId, selectConversation, deleteConversation),
  );
}

function renderMessages() {
  const conversation = current();
  ui.messages.replaceChildren(
    ...conversation.messages.map((m) => renderMessage(m, m.model ?? conversation.model)),
  );
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function renderConversation() {
  const conversation = current();
  ui.title.value = conversation.title;
  ui.system.value = conversation.system;
  renderMessages();
  renderSidebar();
}

function selectConversation(id) {
  state.currentId = id;
  persist();
  renderConversation();
  showSidebar(false);
  ui.input.focus();
}

function startConversation() {
  const conversation = store.newConversation();
  conversation.system = current()?.system ?? "";
  state.conversations.push(conversation);
  selectConversation(conversation.id);
}

function deleteConversation(id) {
  if (state.controller && state.streamingIn === id) state.controller.abort();
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (!state.conversations.length) state.conversations.push(store.newConversation());
  if (!current()) state.currentId = state.conversations[0].id;
  persist();
  renderConversation();
}

// ---- models and the API key ----------------------------------------------------------

function fillModels() {
  const chosen = state.settings.model;
  ui.model.replaceChildren();
  for (const model of state.models) {
    const option = document.createElement("option");
    option.value = model.id;
    option.textContent = isVision(model.id) ? `${model.id} (vision)` : model.id;
    ui.model.append(option);
  }
  if (card(chosen)) ui.model.value = chosen;
  state.settings.model = ui.model.value;
}

async function loadModels() {
  try {
    state.models = await listModels();
    fillModels();
    ui.keyForm.hidden = true;
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) askForKey(loadModels);
    else showBanner(`Could not list models. ${describe(error)}`);
  }
}

function askForKey(retry) {
  state.afterAuth = retry;
  ui.keyForm.hidden = false;
  showBanner(getKey() ? "The API key was refused; enter the right one." : "Enter this server's API key.");
  ui.keyInput.focus();
}

async function saveKey(event) {
  event.preventDefault();
  const key = ui.keyInput.value.trim();
  if (!key) return;
  setKey(key, ui.rememberKey.checked);
  ui.keyInput.value = "";
  ui.keyForm.hidden = true;
  ui.forgetKey.hidden = false;
  hideBanner();
  const retry = state.afterAuth;
  state.afterAuth = null;
  if (retry !== loadModels) await loadModels();
  await retry?.();
}

// ---- attachments ---------------------------------------------------------------------

function renderAttachments() {
  ui.attachments.replaceChildren();
  state.pending.forEach((uri, index) => {
    const thumb = document.createElement("figure");
    thumb.className = "thumb";
    const img = document.createElement("img");
    img.src = uri;
    img.alt = `image ${index + 1} to send`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove image ${index + 1}`);
    remove.addEventListener("click", () => {
      state.pending.splice(index, 1);
      renderAttachments();
    });
    thumb.append(img, remove);
    ui.attachments.append(thumb);
  });
}

function refuseImages() {
  showBanner(`The model '${ui.model.value || "(none)"}' is text-only and cannot read images; choose a model marked (vision).`);
}

/** Attach image files (picker, drop or paste), in the order they were given. */
function addImages(files) {
  const images = [...files].filter((f) => f.type.startsWith("image/"));
  if (!images.length) return state.adding;
  if (!isVision(ui.model.value)) return refuseImages();
  state.adding = state.adding.then(() => convertImages(images)).catch(() => {});
  return state.adding;
}

async function convertImages(images) {
  for (const file of images) {
    if (!isImage(file)) {
      showBanner(`${file.name}: only PNG, JPEG, WebP, GIF and BMP images can be sent.`);
      continue;
    }
    try {
      state.pending.push(await toDataURI(file));
    } catch {
      showBanner(`${file.name}: this image could not be read.`);
    }
  }
  renderAttachments();
}

// ---- sending and streaming -----------------------------------------------------------

let renderQueued = false;
function scheduleRender(message) {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    const old = ui.messages.querySelector(`[data-id="${message.id}"]`);
    if (!old) return; // another conversation is on screen
    const follow = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 80;
    old.replaceWith(renderMessage(message, message.model, old));
    if (follow) ui.messages.scrollTop = ui.messages.scrollHeight;
  });
}

function setStreaming(on) {
  ui.send.hidden = on;
  ui.stop.hidden = !on;
}

async function send() {
  if (state.controller) return;
  await state.adding; // images given just before sending go with this message
  if (state.controller) return;
  const conversation = current();
  const text = ui.input.value.trim();
  const model = ui.model.value;
  if (!text && !state.pending.length) return;
  if (!model) return showBanner("No model to talk to: the server lists none (or needs an API key).");
  const hasImages = state.pending.length || conversation.messages.some((m) => m.images?.length);
  if (hasImages && !isVision(model)) return refuseImages();
  hideBanner();
  const user = { id: messageId(), role: "user", content: text, images: state.pending };
  const reply = { id: messageId(), role: "assistant", model, content: "", reasoning: "", toolCalls: [], streaming: true };
  conversation.messages.push(user);
  const body = {
    model,
    messages: requestMessages(conversation),
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number(ui.temperature.value),
    top_p: Number(ui.topP.value),
    max_tokens: Math.max(1, Math.round(Number(ui.maxTokens.value))),
  };
  conversation.messages.push(reply);
  if (conversation.title === store.NEW_TITLE) conversation.title = (text || "Image").slice(0, 48);
  conversation.model = model;
  conversation.updatedAt = Date.now();
  ui.input.value = "";
  state.pending = [];
  renderAttachments();
  renderConversation();
  await stream(conversation, user, reply, body);
}

/** Stream the reply into `reply`; on an HTTP error before any output, undo the send
 * (text and images back in the composer) so it can be sent again. */
async function stream(conversation, user, reply, body) {
  const controller = new AbortController();
  state.controller = controller;
  state.streamingIn = conversation.id;
  setStreaming(true);
  const onWait = (seconds, error) => showBanner(`${describe(error)} Retrying in ${seconds} s…`);
  const chunks = streamChat(body, { signal: controller.signal, onWait });
  try {
    await readReply(chunks, reply, () => scheduleRender(reply));
    hideBanner();
  } catch (error) {
    const noOutput = reply.stats.ttftS === null;
    if (error.name === "AbortError") {
      reply.stopped = true;
      hideBanner();
    } else if (noOutput && error instanceof ApiError && error.status) {
      undoSend(conversation, user, reply);
      if (error.status === 401) askForKey(send);
      else showBanner(describe(error));
      return;
    } else {
      reply.error = describe(error);
      if (noOutput) showBanner(describe(error));
    }
  } finally {
    state.controller = null;
    setStreaming(false);
  }
  reply.streaming = false;
  conversation.updatedAt = Date.now();
  persist();
  scheduleRender(reply);
}

function undoSend(conversation, user, reply) {
  conversation.messages = conversation.messages.filter((m) => m !== user && m !== reply);
  ui.input.value = user.content;
  state.pending = user.images;
  renderAttachments();
  renderConversation();
}

function stop() {
  state.controller?.abort();
}

// ---- events --------------------------------------------------------------------------

function bindSettings() {
  ui.temperature.value = state.settings.temperature;
  ui.topP.value = state.settings.top_p;
  ui.maxTokens.value = state.settings.max_tokens;
  const saveNumbers = () => {
    state.settings.temperature = Number(ui.temperature.value);
    state.settings.top_p = Number(ui.topP.value);
    state.settings.max_tokens = Number(ui.maxTokens.value);
    persist();
  };
  for (const input of [ui.temperature, ui.topP, ui.maxTokens]) input.addEventListener("change", saveNumbers);
  ui.model.addEventListener("change", () => {
    state.settings.model = ui.model.value;
    persist();
  });
  ui.system.addEventListener("change", () => {
    current().system = ui.system.value;
    persist();
  });
  ui.title.addEventListener("change", () => {
    current().title = ui.title.value.trim() || store.NEW_TITLE;
    persist();
    renderSidebar();
  });
}

function bindComposer() {
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.controller) stop();
  });
  ui.stop.addEventListener("click", stop);
  ui.attach.addEventListener("click", () => ui.fileInput.click());
  ui.fileInput.addEventListener("change", async () => {
    await addImages(ui.fileInput.files);
    ui.fileInput.value = "";
  });
  ui.input.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files ?? [])];
    if (files.some((f) => f.type.startsWith("image/"))) {
      event.preventDefault();
      addImages(files);
    }
  });
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    document.body.classList.remove("dragging");
    addImages(event.dataTransfer?.files ?? []);
  });
}

function bindPage() {
  ui.newChat.addEventListener("click", startConversation);
  ui.exportButton.addEventListener("click", () => store.exportConversation(current()));
  ui.bannerClose.addEventListener("click", hideBanner);
  ui.keyForm.addEventListener("submit", saveKey);
  ui.forgetKey.hidden = !getKey();
  ui.forgetKey.addEventListener("click", () => {
    forgetKey();
    ui.forgetKey.hidden = true;
    loadModels();
  });
  ui.menu.addEventListener("click", () => showSidebar(!ui.sidebar.classList.contains("open")));
  // On a narrow window the sidebar is a drawer: a click beside it or Esc closes it.
  document.querySelector(".chat").addEventListener("click", (event) => {
    if (!ui.menu.contains(event.target)) showSidebar(false);
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") showSidebar(false);
  });
}

function showSidebar(open) {
  ui.sidebar.classList.toggle("open", open);
  ui.menu.setAttribute("aria-expanded", String(open));
}

function main() {
  // A reply cut short by closing the page is kept as it was, marked stopped.
  for (const conversation of state.conversations) {
    for (const m of conversation.messages) if (m.streaming) Object.assign(m, { streaming: false, stopped: true });
  }
  if (!current()) {
    state.conversations.push(store.newConversation());
    state.currentId = state.conversations.at(-1).id;
  }
  bindSettings();
  bindComposer();
  bindPage();
  renderConversation();
  loadModels();
  ui.input.focus();
}

main();
