/**
 * QMP input framing: a stream of JSON texts, not necessarily newline separated. Objects and
 * arrays are cut out by tracking nesting (strings and escapes respected); anything else outside
 * a value is reported as bad tokens, one error per token, as QEMU's streaming lexer does.
 */
export type Framed = { value: unknown } | { error: string };

/** Largest single JSON text accepted (QEMU's parser limit is 64 MiB of tokens; we stay lower). */
const MAX_TEXT = 16 * 1024 * 1024;

export class JsonStream {
  private buf = '';
  private depth = 0;
  private inString = false;
  private escape = false;
  private start = -1;
  private scan = 0;

  push(chunk: string): Framed[] {
    this.buf += chunk;
    const out: Framed[] = [];
    let i = this.scan;
    while (i < this.buf.length) {
      const c = this.buf[i];
      if (this.depth > 0) {
        if (this.inString) {
          if (this.escape) this.escape = false;
          else if (c === '\\') this.escape = true;
          else if (c === '"') this.inString = false;
        } else if (c === '"') this.inString = true;
        else if (c === '{' || c === '[') this.depth++;
        else if (c === '}' || c === ']') {
          this.depth--;
          if (this.depth === 0) {
            const text = this.buf.slice(this.start, i + 1);
            try {
              out.push({ value: JSON.parse(text) });
            } catch {
              out.push({ error: 'JSON parse error, expecting value' });
            }
            this.buf = this.buf.slice(i + 1);
            i = 0;
            this.start = -1;
            continue;
          }
        }
        if (i - this.start > MAX_TEXT) {
          out.push({ error: 'JSON parse error, token too large' });
          this.reset();
          return out;
        }
        i++;
        continue;
      }
      if (c === '{' || c === '[') {
        this.depth = 1;
        this.start = i;
        i++;
        continue;
      }
      if (/\s/.test(c)) {
        i++;
        continue;
      }
      // A token outside any object: read it whole (up to whitespace or a bracket).
      let j = i;
      while (j < this.buf.length && !/[\s{}[\]]/.test(this.buf[j])) j++;
      if (j === this.buf.length && j - i < 256) break; // may continue in the next chunk
      const tok = this.buf.slice(i, j);
      out.push({ error: /^[A-Za-z]/.test(tok) ? `JSON parse error, invalid keyword '${tok}'` : 'QMP input must be a JSON object' });
      this.buf = this.buf.slice(j);
      i = 0;
    }
    this.scan = i;
    if (this.depth === 0 && this.start < 0) {
      this.buf = this.buf.slice(i);
      this.scan = 0;
    }
    return out;
  }

  private reset(): void {
    this.buf = '';
    this.depth = 0;
    this.inString = false;
    this.escape = false;
    this.start = -1;
    this.scan = 0;
  }
}
