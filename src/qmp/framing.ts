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

function isDelimiter(c: number): boolean {
  return isSpace(c) || c === OPEN_BRACE || c === CLOSE_BRACE || c === OPEN_BRACKET || c === CLOSE_BRACKET;
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
  /** A bad token outside any value: its first bytes, and whether it was already reported. */
  private token: Buffer[] | null = null;
  private tokenLen = 0;
  private tokenReported = false;

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
      if (this.token && isDelimiter(c)) this.endToken(out);
      if (c === OPEN_BRACE || c === OPEN_BRACKET) {
        this.depth = 1;
        start = i;
      } else if (!isSpace(c)) {
        this.addToken(out, b.subarray(i, i + 1));
      }
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

  private addToken(out: Framed[], byte: Buffer): void {
    if (!this.token) {
      this.token = [];
      this.tokenLen = 0;
      this.tokenReported = false;
    }
    if (this.tokenReported) return;
    this.token.push(byte);
    this.tokenLen++;
    if (this.tokenLen >= MAX_TOKEN) {
      out.push(tokenError(Buffer.concat(this.token).toString('utf8')));
      this.tokenReported = true;
    }
  }

  private endToken(out: Framed[]): void {
    if (this.token && !this.tokenReported) out.push(tokenError(Buffer.concat(this.token).toString('utf8')));
    this.token = null;
  }
}

function tokenError(tok: string): Framed {
  return { error: /^[A-Za-z]/.test(tok) ? `JSON parse error, invalid keyword '${tok}'` : 'QMP input must be a JSON object' };
}
