/**
 * QMP input framing: a stream of JSON texts, not necessarily newline separated. Objects and
 * arrays are cut out by tracking nesting (strings and escapes respected); anything else outside
 * a value is reported as bad tokens, one error per token, as QEMU's streaming lexer does.
 *
 * The scan works on bytes, once per byte: a text is kept as the list of chunk slices it spans
 * and decoded only when complete. A text nested deeper than QEMU's limit or longer than ours is
 * reported once and skipped to its end, holding no memory.
 */
export type Framed = { value: unknown } | { error: string };

/** Largest single JSON text accepted (QEMU's token size limit is 64 MiB; we stay lower). */
export const MAX_TEXT = 16 * 1024 * 1024;
/** QEMU's MAX_NESTING. */
export const MAX_NESTING = 1024;
/** A bad token outside any value is reported once it ends or reaches this length. */
const MAX_TOKEN = 256;

const OPEN_BRACE = 0x7b, CLOSE_BRACE = 0x7d, OPEN_BRACKET = 0x5b, CLOSE_BRACKET = 0x5d, QUOTE = 0x22, BACKSLASH = 0x5c;

function isSpace(c: number): boolean {
  return c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d || c === 0x0b || c === 0x0c;
}

export class JsonStream {
  private depth = 0;
  private inString = false;
  private escape = false;
  /** Slices of the current text (depth > 0) and their total length. */
  private parts: Buffer[] = [];
  private size = 0;
  /** The current text broke a limit: it is skipped to its end. */
  private skipping = false;
  /**
   * A token outside any value (QEMU's lexer classes): a keyword [a-z]+, a number, a string, or
   * one UTF-8 sequence; its first bytes, and whether it was already reported.
   */
  private token: Buffer[] | null = null;
  private tokenKind: 'keyword' | 'number' | 'string' | 'utf8' = 'keyword';
  private tokenLen = 0;
  private tokenReported = false;
  /** Inside a top-level string: after a backslash; past its closing quote. */
  private tokenEscape = false;
  private tokenClosed = false;

  push(chunk: Buffer | string): Framed[] {
    const b = typeof chunk === 'string' ? Buffer.from(chunk, 'utf8') : chunk;
    const out: Framed[] = [];
    let start = this.depth > 0 ? 0 : -1;
    let i = 0;
    const keep = (end: number): void => {
      if (start < 0 || this.skipping) return;
      this.parts.push(b.subarray(start, end));
      this.size += end - start;
    };
    while (i < b.length) {
      const c = b[i];
      if (this.depth > 0) {
        if (this.inString) {
          if (this.escape) this.escape = false;
          else if (c === BACKSLASH) this.escape = true;
          else if (c === QUOTE) this.inString = false;
        } else if (c === QUOTE) this.inString = true;
        else if (c === OPEN_BRACE || c === OPEN_BRACKET) {
          this.depth++;
          if (this.depth > MAX_NESTING && !this.skipping) this.fail(out, 'JSON nesting depth limit exceeded');
        } else if (c === CLOSE_BRACE || c === CLOSE_BRACKET) {
          this.depth--;
          if (this.depth === 0) {
            keep(i + 1);
            if (!this.skipping) out.push(this.parse());
            this.parts = [];
            this.size = 0;
            this.skipping = false;
            start = -1;
            i++;
            continue;
          }
        }
        if (!this.skipping && this.size + (i + 1 - start) > MAX_TEXT) this.fail(out, 'JSON token size limit exceeded');
        i++;
        continue;
      }
      if (this.token) {
        if (this.continues(c)) {
          this.addToken(out, b.subarray(i, i + 1));
          i++;
          continue;
        }
        this.endToken(out, c);
      }
      if (c === OPEN_BRACE || c === OPEN_BRACKET) {
        this.depth = 1;
        start = i;
      } else if (c >= 0x61 && c <= 0x7a) this.startToken(out, 'keyword', b.subarray(i, i + 1));
      else if (c === 0x2d || (c >= 0x30 && c <= 0x39)) this.startToken(out, 'number', b.subarray(i, i + 1));
      else if (c === QUOTE) this.startToken(out, 'string', b.subarray(i, i + 1));
      else if (c >= 0xc0 && c < 0xf8) this.startToken(out, 'utf8', b.subarray(i, i + 1));
      // Tokens that are JSON but no value: the parser's text.
      else if (c === CLOSE_BRACE || c === CLOSE_BRACKET || c === 0x3a || c === 0x2c) out.push({ error: 'JSON parse error, expecting value' });
      else if (c >= 0x80) out.push(stray('\uFFFD'));
      else if (!isSpace(c)) out.push(stray(String.fromCharCode(c)));
      i++;
    }
    keep(b.length);
    return out;
  }

  private fail(out: Framed[], error: string): void {
    out.push({ error });
    this.skipping = true;
    this.parts = [];
    this.size = 0;
  }

  private parse(): Framed {
    const text = Buffer.concat(this.parts, this.size).toString('utf8');
    try {
      return { value: JSON.parse(text) };
    } catch {
      return { error: 'JSON parse error, expecting value' };
    }
  }

  private startToken(out: Framed[], kind: JsonStream['tokenKind'], byte: Buffer): void {
    this.token = [];
    this.tokenKind = kind;
    this.tokenLen = 0;
    this.tokenReported = false;
    this.tokenEscape = false;
    this.tokenClosed = false;
    this.addToken(out, byte);
  }

  /** Whether byte `c` belongs to the token under way. */
  private continues(c: number): boolean {
    switch (this.tokenKind) {
      case 'keyword': return c >= 0x61 && c <= 0x7a;
      case 'number': return (c >= 0x30 && c <= 0x39) || c === 0x2e || c === 0x65 || c === 0x45 || c === 0x2b || c === 0x2d;
      case 'utf8': return c >= 0x80 && c < 0xc0;
      case 'string':
        if (this.tokenClosed) return false;
        if (this.tokenEscape) this.tokenEscape = false;
        else if (c === BACKSLASH) this.tokenEscape = true;
        else if (c === QUOTE) this.tokenClosed = true;
        return true;
    }
  }

  private addToken(out: Framed[], byte: Buffer): void {
    if (!this.token || this.tokenReported) return;
    this.token.push(byte);
    this.tokenLen++;
    if (this.tokenLen >= MAX_TOKEN && this.tokenKind === 'keyword') {
      out.push(this.tokenError(''));
      this.tokenReported = true;
    }
  }

  /** The token ends before byte `next` (-1: at a delimiter QEMU's lexer needs no look at). */
  private endToken(out: Framed[], next: number): void {
    if (this.token && !this.tokenReported) out.push(this.tokenError(next >= 0 && next < 0x80 ? String.fromCharCode(next) : ''));
    this.token = null;
  }

  /** QEMU's answer to a complete token outside any object. */
  private tokenError(next: string): Framed {
    const tok = Buffer.concat(this.token ?? []).toString('latin1');
    switch (this.tokenKind) {
      case 'keyword':
        return tok === 'true' || tok === 'false' || tok === 'null' ? { error: NOT_OBJECT } : { error: `JSON parse error, invalid keyword '${tok}'` };
      case 'number':
        // A well-formed number is a value; a broken one is a lexer error naming the byte it stopped at.
        return /^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?$/.test(tok) ? { error: NOT_OBJECT } : stray(tok + next);
      case 'string': return { error: NOT_OBJECT };
      case 'utf8': return stray('\uFFFD');
    }
  }
}

const NOT_OBJECT = 'QMP input must be a JSON object';

function stray(s: string): Framed {
  return { error: `JSON parse error, stray '${s}'` };
}
