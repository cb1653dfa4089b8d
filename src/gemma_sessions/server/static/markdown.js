// A small markdown renderer for untrusted text (model replies): it builds DOM nodes and sets only textContent, so
// no input can become markup, a script or an event handler. Links keep only http(s) and mailto URLs.
//
// Blocks: fenced code (``` closes or the text ends, as while a reply streams), headings, block quotes, lists,
// rules, paragraphs (line breaks kept). Inline: `code`, **bold**, *italic* / _italic_, [text](url).

const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)\s*$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Render `text` as markdown into a new DocumentFragment. */
export function renderMarkdown(text) {
  const out = document.createDocumentFragment();
  renderBlocks(String(text).replace(/\r\n?/g, "\n").split("\n"), out);
  return out;
}

function renderBlocks(lines, out) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = FENCE.exec(line))) {
      const body = [];
      i += 1;
      while (i < lines.length && !(FENCE.exec(lines[i]) && lines[i].trim().startsWith(m[1]))) body.push(lines[i++]);
      i += 1; // the closing fence (or past the end)
      out.append(codeBlock(body.join("\n"), m[2]));
    } else if (!line.trim()) {
      i += 1;
    } else if ((m = HEADING.exec(line))) {
      const level = Math.min(6, m[1].length + 2); // the page's own headings stop at h3
      const h = el(`h${level}`, "md-heading");
      renderInline(m[2], h);
      out.append(h);
      i += 1;
    } else if (RULE.test(line)) {
      out.append(el("hr"));
      i += 1;
    } else if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) { body.push(m[1]); i += 1; }
      const q = el("blockquote");
      renderBlocks(body, q);
      out.append(q);
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      i = renderList(lines, i, out);
    } else {
      const body = [];
      while (i < lines.length && lines[i].trim() && !FENCE.test(lines[i]) && !HEADING.test(lines[i])
             && !QUOTE.test(lines[i]) && !BULLET.test(lines[i]) && !NUMBERED.test(lines[i])) body.push(lines[i++]);
      const p = el("p");
      renderInline(body.join("\n"), p);
      out.append(p);
    }
  }
}

function renderList(lines, i, out) {
  const ordered = NUMBERED.test(lines[i]) && !BULLET.test(lines[i]);
  const list = el(ordered ? "ol" : "ul");
  if (ordered) {
    const start = parseInt(NUMBERED.exec(lines[i])[1], 10);
    if (start !== 1) list.start = start;
  }
  const pattern = ordered ? NUMBERED : BULLET;
  let m;
  while (i < lines.length && (m = pattern.exec(lines[i]))) {
    const li = el("li");
    renderInline(m[m.length - 1], li);
    list.append(li);
    i += 1;
  }
  out.append(list);
  return i;
}

function codeBlock(code, lang) {
  const wrap = el("div", "code-block");
  const bar = el("div", "code-bar");
  bar.append(el("span", "code-lang", lang || "code"));
  const copy = el("button", "btn tiny", "Copy");
  copy.type = "button";
  copy.setAttribute("aria-label", "Copy code");
  copy.addEventListener("click", () => {
    navigator.clipboard?.writeText(code).then(() => { copy.textContent = "Copied"; }, () => {});
  });
  bar.append(copy);
  const pre = el("pre");
  pre.tabIndex = 0; // a long line scrolls: keyboard users can reach it
  pre.append(el("code", lang ? `language-${lang}` : "", code));
  wrap.append(bar, pre);
  return wrap;
}

// Inline: `code` and [text](url) by pattern; emphasis by delimiter runs (* or _, one for em, two for strong) that
// close on the same run, as CommonMark does in the common cases: "_" never opens or closes inside a word
// (snake_case, window.__name), and a longer run (***) stays text.
const CODE = /^`([^`\n]+)`/;
const LINK = /^\[([^\]\n]+)\]\(([^)\s]+)\)/;
const WORD = /[\p{L}\p{N}]/u;

function renderInline(text, into) {
  let plain = "";
  let i = 0;
  const flush = () => { if (plain) { into.append(document.createTextNode(plain)); plain = ""; } };
  while (i < text.length) {
    const c = text[i];
    const rest = text.slice(i);
    let m;
    if (c === "`" && (m = CODE.exec(rest))) {
      flush();
      into.append(el("code", "", m[1]));
      i += m[0].length;
    } else if (c === "[" && (m = LINK.exec(rest))) {
      flush();
      into.append(link(m[1], m[2]));
      i += m[0].length;
    } else if (c === "*" || c === "_") {
      let run = 1;
      while (text[i + run] === c) run += 1;
      const close = run <= 2 && !(c === "_" && i > 0 && WORD.test(text[i - 1])) ? closing(text, i + run, c, run) : -1;
      if (close < 0) {
        plain += text.slice(i, i + run);
        i += run;
        continue;
      }
      flush();
      const span = el(run === 2 ? "strong" : "em");
      renderInline(text.slice(i + run, close), span);
      into.append(span);
      i = close + run;
    } else {
      plain += c;
      i += 1;
    }
  }
  flush();
}

/** Where the run of `n` x `c` that closes an emphasis opened before `from` starts, or -1. */
function closing(text, from, c, n) {
  if (from >= text.length || /\s/.test(text[from])) return -1; // an opener is followed by text
  const delim = c.repeat(n);
  for (let j = text.indexOf(delim, from + 1); j >= 0; j = text.indexOf(delim, j + 1)) {
    const before = text[j - 1];
    const after = text[j + n];
    if (/\s/.test(before) || before === c || after === c) continue;
    if (c === "_" && after !== undefined && WORD.test(after)) continue;
    return j;
  }
  return -1;
}

function link(label, href) {
  let url = null;
  try { url = new URL(href, window.location.href); } catch { url = null; }
  if (!url || !["http:", "https:", "mailto:"].includes(url.protocol)) {
    return document.createTextNode(`[${label}](${href})`); // shown as typed, never followed
  }
  const a = el("a", "", label);
  a.href = url.href;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  return a;
}
