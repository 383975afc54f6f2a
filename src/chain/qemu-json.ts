/**
 * The JSON reader QEMU uses for `json:` pseudo-filenames (qobject_from_json): standard JSON plus
 * single-quoted strings, one value only, with QEMU 7.2's error texts ("JSON parse error, ...",
 * "Expecting a JSON value", "Expecting at most one JSON value"). Objects come back as Maps so
 * that member order and duplicates are QEMU's to judge.
 */
export type JsonValue = string | number | boolean | null | JsonValue[] | Map<string, JsonValue>;

export class JsonParseError extends Error {}

type Token = { t: 'punct'; v: string } | { t: 'value'; v: JsonValue } | { t: 'eof' };

const PUNCT = '{}[]:,';
const ESCAPES: Record<string, string> = { '"': '"', "'": "'", '\\': '\\', '/': '/', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t' };
const NUMBER = /^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/;

class Lexer {
  private pos = 0;
  constructor(private readonly s: string) {}

  /** Whether only white space is left. */
  atEnd(): boolean {
    while (this.pos < this.s.length && ' \t\n\r'.includes(this.s[this.pos])) this.pos++;
    return this.pos >= this.s.length;
  }

  next(): Token {
    if (this.atEnd()) return { t: 'eof' };
    const s = this.s, c = s[this.pos];
    if (PUNCT.includes(c)) {
      this.pos++;
      return { t: 'punct', v: c };
    }
    if (c === '"' || c === "'") return { t: 'value', v: this.string(c) };
    if (/[a-z]/.test(c)) {
      const m = /^[a-z]+/.exec(s.slice(this.pos)) as RegExpExecArray;
      this.pos += m[0].length;
      if (m[0] === 'true') return { t: 'value', v: true };
      if (m[0] === 'false') return { t: 'value', v: false };
      if (m[0] === 'null') return { t: 'value', v: null };
      throw new JsonParseError(`JSON parse error, invalid keyword '${m[0]}'`);
    }
    const m = NUMBER.exec(s.slice(this.pos));
    if (m && !/[0-9.eE]/.test(s[this.pos + m[0].length] ?? '')) {
      this.pos += m[0].length;
      return { t: 'value', v: Number(m[0]) };
    }
    // What the lexer cannot take, up to the next delimiter (QEMU: "stray '...'").
    const rest = /^[^\s{}[\]:,]*/.exec(s.slice(this.pos)) as RegExpExecArray;
    throw new JsonParseError(`JSON parse error, stray '${rest[0] || c}'`);
  }

  private string(q: string): string {
    const s = this.s, start = this.pos;
    let out = '';
    for (let i = this.pos + 1; i < s.length; i++) {
      const c = s[i];
      if (c === q) {
        this.pos = i + 1;
        return out;
      }
      if (c !== '\\') {
        out += c;
        continue;
      }
      const e = s[++i];
      if (e === undefined) break;
      if (e in ESCAPES) out += ESCAPES[e];
      else if (e === 'u' && /^[0-9a-fA-F]{4}$/.test(s.slice(i + 1, i + 5))) {
        out += String.fromCharCode(parseInt(s.slice(i + 1, i + 5), 16));
        i += 4;
      } else throw new JsonParseError('JSON parse error, invalid escape sequence in string');
    }
    // An unterminated string is one bad token to the end of the input.
    throw new JsonParseError(`JSON parse error, stray '${s.slice(start)}'`);
  }
}

class Parser {
  private peeked: Token | null = null;
  constructor(private readonly lex: Lexer) {}

  private take(): Token {
    const t = this.peeked ?? this.lex.next();
    this.peeked = null;
    return t;
  }

  private peek(): Token {
    this.peeked ??= this.lex.next();
    return this.peeked;
  }

  value(): JsonValue {
    const t = this.take();
    if (t.t === 'eof') throw new JsonParseError('JSON parse error, premature EOI');
    if (t.t === 'value') return t.v;
    if (t.v === '{') return this.object();
    if (t.v === '[') return this.list();
    throw new JsonParseError('JSON parse error, expecting value');
  }

  private object(): Map<string, JsonValue> {
    const m = new Map<string, JsonValue>();
    if (this.isPunct(this.peek(), '}')) {
      this.take();
      return m;
    }
    for (;;) {
      const key = this.value();
      if (typeof key !== 'string') throw new JsonParseError('JSON parse error, key is not a string in object');
      const colon = this.take();
      if (colon.t === 'eof') throw new JsonParseError('JSON parse error, premature EOI');
      if (!this.isPunct(colon, ':')) throw new JsonParseError('JSON parse error, missing : in object pair');
      const v = this.value();
      if (m.has(key)) throw new JsonParseError('JSON parse error, duplicate key');
      m.set(key, v);
      const sep = this.take();
      if (sep.t === 'eof') throw new JsonParseError('JSON parse error, premature EOI');
      if (this.isPunct(sep, '}')) return m;
      if (!this.isPunct(sep, ',')) throw new JsonParseError('JSON parse error, expected separator in dict');
    }
  }

  private list(): JsonValue[] {
    const l: JsonValue[] = [];
    if (this.isPunct(this.peek(), ']')) {
      this.take();
      return l;
    }
    for (;;) {
      l.push(this.value());
      const sep = this.take();
      if (sep.t === 'eof') throw new JsonParseError('JSON parse error, premature EOI');
      if (this.isPunct(sep, ']')) return l;
      if (!this.isPunct(sep, ',')) throw new JsonParseError('JSON parse error, expected separator in list');
    }
  }

  private isPunct(t: Token, v: string): boolean {
    return t.t === 'punct' && t.v === v;
  }
}

/** Parse exactly one JSON value (QEMU's qobject_from_json); throws JsonParseError with QEMU's text. */
export function parseQemuJson(text: string): JsonValue {
  const lex = new Lexer(text);
  if (lex.atEnd()) throw new JsonParseError('Expecting a JSON value');
  const v = new Parser(lex).value();
  if (!lex.atEnd()) throw new JsonParseError('Expecting at most one JSON value');
  return v;
}
