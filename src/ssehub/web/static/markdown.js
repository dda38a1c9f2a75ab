// A small Markdown renderer that builds DOM nodes and sets only textContent, so model output
// can never become HTML: a "<script>" in a reply is shown as the text "<script>".
//
// Covers what chat replies use: paragraphs, headings, fenced code, inline code, bold,
// italic, links (http, https and mailto only), bullet and numbered lists, block quotes,
// horizontal rules. Partial input (a reply still streaming) renders sensibly: an unclosed
// code fence is code up to the end.

const SAFE_URL = /^(https?:|mailto:)/i;

function el(doc, tag, text) {
  const node = doc.createElement(tag);
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Append the inline content of `text` (code, bold, italic, links) to `parent`. */
export function renderInline(text, parent) {
  const doc = parent.ownerDocument;
  // One pass, left to right: code spans first so nothing inside them is interpreted.
  const pattern = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([^*]+?)\*\*|__([^_]+?)__|\*([^*\s][^*]*?)\*|_([^_\s][^_]*?)_(?![A-Za-z0-9])|\[([^\]]+)\]\(([^)\s]+)\)/g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    if (match.index > last) parent.append(text.slice(last, match.index));
    last = match.index + match[0].length;
    if (match[1] !== undefined) {
      parent.append(el(doc, "code", match[2]));
    } else if (match[3] !== undefined || match[4] !== undefined) {
      const strong = el(doc, "strong");
      renderInline(match[3] ?? match[4], strong);
      parent.append(strong);
    } else if (match[5] !== undefined || match[6] !== undefined) {
      const em = el(doc, "em");
      renderInline(match[5] ?? match[6], em);
      parent.append(em);
    } else {
      const href = match[8];
      if (SAFE_URL.test(href)) {
        const a = el(doc, "a");
        a.href = href;
        a.rel = "noopener noreferrer nofollow";
        a.target = "_blank";
        renderInline(match[7], a);
        parent.append(a);
      } else {
        parent.append(match[0]);
      }
    }
  }
  if (last < text.length) parent.append(text.slice(last));
}

/** Render `source` as Markdown into `container`, replacing what it held. */
export function renderMarkdown(source, container) {
  const doc = container.ownerDocument;
  const out = doc.createDocumentFragment();
  const lines = source.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  let paragraph = [];
  const flush = () => {
    if (paragraph.length) {
      const p = el(doc, "p");
      paragraph.forEach((line, n) => {
        if (n) p.append(el(doc, "br"));
        renderInline(line, p);
      });
      out.append(p);
      paragraph = [];
    }
  };
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*(```+|~~~+)\s*([\w+-]*)/);
    if (fence) {
      flush();
      const body = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i++;
      const pre = el(doc, "pre");
      const code = el(doc, "code", body.join("\n"));
      if (fence[2]) code.dataset.lang = fence[2];
      pre.append(code);
      out.append(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      flush();
      const h = el(doc, `h${Math.min(6, heading[1].length + 2)}`);
      renderInline(heading[2], h);
      out.append(h);
      i++;
      continue;
    }
    if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      flush();
      out.append(el(doc, "hr"));
      i++;
      continue;
    }
    const item = line.match(/^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/);
    if (item) {
      flush();
      const ordered = /\d/.test(item[1]);
      const list = el(doc, ordered ? "ol" : "ul");
      if (ordered) {
        const start = parseInt(item[1], 10);
        if (start !== 1) list.start = start;
      }
      while (i < lines.length) {
        const m = lines[i].match(/^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/);
        if (!m || /\d/.test(m[1]) !== ordered) break;
        const li = el(doc, "li");
        renderInline(m[2], li);
        list.append(li);
        i++;
      }
      out.append(list);
      continue;
    }
    if (/^\s*>/.test(line)) {
      flush();
      const quoted = [];
      while (i < lines.length && /^\s*>/.test(lines[i])) {
        quoted.push(lines[i].replace(/^\s*> ?/, ""));
        i++;
      }
      const blockquote = el(doc, "blockquote");
      renderMarkdown(quoted.join("\n"), blockquote);
      out.append(blockquote);
      continue;
    }
    if (line.trim() === "") {
      flush();
    } else {
      paragraph.push(line);
    }
    i++;
  }
  flush();
  container.replaceChildren(out);
}
