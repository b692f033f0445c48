// A small Markdown renderer for model output.
//
// Safety by construction: model text is never parsed as HTML. Every node is built with
// document.createElement and filled with textContent, so `<img onerror=...>` or
// `<script>` in a reply is shown as the literal characters and can never run or load
// anything. No sanitizer library is needed because no HTML string is ever produced.
// Links are created only for http:/https: URLs (anything else, `javascript:` included,
// stays plain text) and open with rel="noopener noreferrer"; images are not rendered at
// all (and the page's Content-Security-Policy blocks remote images anyway).
//
// Supported: fenced code blocks (with a copy button), headings, lists, block quotes,
// horizontal rules, paragraphs; inline code, bold, italic, strikethrough and links.

const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
const NUMBERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;

// Inline tokens, earliest match wins: `code`, [text](url), **bold**, __bold__, ~~strike~~,
// *italic*, _italic_ (underscores only at word edges, so snake_case stays text).
const INLINE =
  /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)|\[([^\]\n]+)\]\(\s*([^)\s]+)\s*\)|\*\*(?=\S)([\s\S]+?)\*\*|(?<!\w)__(?=\S)([\s\S]*?\S)__(?!\w)|~~(?=\S)([\s\S]+?)~~|\*(?=[^\s*])([\s\S]*?[^\s*])\*|(?<!\w)_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** The URL if it is absolute http(s), else null. */
export function safeHref(raw) {
  try {
    const url = new URL(raw);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

/** Append the inline Markdown of `text` to `parent` as text, <code>, <strong>, ... */
function renderInline(parent, text) {
  while (text) {
    const match = INLINE.exec(text);
    if (!match) {
      parent.append(text);
      return;
    }
    if (match.index > 0) parent.append(text.slice(0, match.index));
    const [whole, ticks, code, linkText, linkUrl, bold1, bold2, strike, italic1, italic2] = match;
    if (ticks) {
      parent.append(el("code", null, code.replace(/^ (.*) $/, "$1")));
    } else if (linkText !== undefined) {
      const href = safeHref(linkUrl);
      if (href) {
        const link = el("a");
        link.href = href;
        link.rel = "noopener noreferrer";
        link.target = "_blank";
        renderInline(link, linkText);
        parent.append(link);
      } else {
        parent.append(whole); // not http(s): shown as the literal text
      }
    } else {
      const tag = bold1 || bold2 ? "strong" : strike ? "del" : "em";
      const node = el(tag);
      renderInline(node, bold1 ?? bold2 ?? strike ?? italic1 ?? italic2);
      parent.append(node);
    }
    text = text.slice(match.index + whole.length);
  }
}

/** Lines → paragraph with explicit line breaks kept. */
function paragraph(lines) {
  const p = el("p");
  lines.forEach((line, i) => {
    if (i > 0) p.append(el("br"));
    renderInline(p, line);
  });
  return p;
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // Not a secure context (e.g. plain http on a LAN address): select for Ctrl+C.
    const range = document.createRange();
    range.selectNodeContents(button.closest(".code-block").querySelector("code"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
  }
  button.textContent = "Copied";
  setTimeout(() => (button.textContent = "Copy"), 1500);
}

function codeBlock(lang, code) {
  const block = el("div", "code-block");
  const head = el("div", "code-head");
  head.append(el("span", "code-lang", lang || "text"));
  const copy = el("button", "copy", "Copy");
  copy.type = "button";
  copy.setAttribute("aria-label", `Copy ${lang || "code"} to the clipboard`);
  copy.addEventListener("click", () => copyText(code, copy));
  head.append(copy);
  const pre = el("pre");
  pre.append(el("code", lang ? `language-${lang}` : null, code));
  block.append(head, pre);
  return block;
}

function list(items, ordered, start) {
  const node = el(ordered ? "ol" : "ul");
  if (ordered && start !== 1) node.start = start;
  for (const item of items) {
    const li = el("li");
    renderInline(li, item);
    node.append(li);
  }
  return node;
}

/** Markdown → a DocumentFragment of safe DOM nodes. */
export function renderMarkdown(source) {
  const out = document.createDocumentFragment();
  const lines = source.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = FENCE.exec(line))) {
      const fence = m[1];
      const body = [];
      i++;
      // An unclosed fence (a reply still streaming) runs to the end.
      while (i < lines.length && !lines[i].trimStart().startsWith(fence)) body.push(lines[i++]);
      i++;
      out.append(codeBlock(m[2], body.join("\n")));
    } else if ((m = HEADING.exec(line))) {
      const heading = el(`h${m[1].length}`);
      renderInline(heading, m[2]);
      out.append(heading);
      i++;
    } else if (RULE.test(line)) {
      out.append(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const quoted = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) {
        quoted.push(m[1]);
        i++;
      }
      const quote = el("blockquote");
      quote.append(renderMarkdown(quoted.join("\n")));
      out.append(quote);
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      const ordered = !BULLET.test(line);
      const pattern = ordered ? NUMBERED : BULLET;
      const start = ordered ? Number(NUMBERED.exec(line)[1]) : 1;
      const items = [];
      while (i < lines.length && (m = pattern.exec(lines[i]))) {
        items.push(ordered ? m[2] : m[1]);
        i++;
        // Indented continuation lines belong to the item.
        while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !pattern.test(lines[i])) {
          items[items.length - 1] += ` ${lines[i++].trim()}`;
        }
      }
      out.append(list(items, ordered, start));
    } else if (!line.trim()) {
      i++;
    } else {
      const para = [];
      while (
        i < lines.length &&
        lines[i].trim() &&
        !FENCE.test(lines[i]) &&
        !HEADING.test(lines[i]) &&
        !QUOTE.test(lines[i]) &&
        !BULLET.test(lines[i]) &&
        !NUMBERED.test(lines[i]) &&
        !RULE.test(lines[i])
      ) {
        para.push(lines[i++]);
      }
      out.append(paragraph(para));
    }
  }
  return out;
}
