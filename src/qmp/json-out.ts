/**
 * JSON as QEMU's monitor writes it (qobject_to_json): ", " between members and elements, ": "
 * after keys, strings with only printable ASCII left as is (everything else \uXXXX, upper-case
 * hex, surrogate pairs beyond the BMP), integers as integers and other numbers as C's "%.17g".
 * Byte for byte what QSD sends, so that clients matching text (grep '"return": {}') work alike.
 */
export function qemuJson(v: unknown): string {
  // Normalise first (toJSON methods, undefined members dropped), as JSON.stringify would.
  return write(JSON.parse(JSON.stringify(v) ?? 'null') as unknown);
}

function write(v: unknown): string {
  if (v === null) return 'null';
  if (typeof v === 'string') return str(v);
  if (typeof v === 'number') return num(v);
  if (typeof v === 'boolean') return v ? 'true' : 'false';
  if (Array.isArray(v)) return `[${v.map(write).join(', ')}]`;
  return `{${Object.entries(v as Record<string, unknown>).map(([k, x]) => `${str(k)}: ${write(x)}`).join(', ')}}`;
}

const SHORT: Record<string, string> = { '"': '\\"', '\\': '\\\\', '\b': '\\b', '\f': '\\f', '\n': '\\n', '\r': '\\r', '\t': '\\t' };

function hex4(n: number): string {
  return n.toString(16).toUpperCase().padStart(4, '0');
}

function str(s: string): string {
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const ch = s[i];
    const c = s.charCodeAt(i);
    if (SHORT[ch] !== undefined) out += SHORT[ch];
    else if (c >= 0x20 && c <= 0x7e) out += ch;
    else out += `\\u${hex4(c)}`;
  }
  return `${out}"`;
}

function num(n: number): string {
  if (Number.isInteger(n) && Math.abs(n) < 2 ** 63) return Object.is(n, -0) ? '0' : String(n);
  // C's %.17g: 17 significant digits, trailing zeros dropped, exponent form below 1e-4 and from 1e17.
  const [mant, e] = n.toExponential(16).split('e');
  const exp = Number(e);
  if (exp < -4 || exp >= 17) {
    const m = mant.includes('.') ? mant.replace(/0+$/, '').replace(/\.$/, '') : mant;
    return `${m}e${exp < 0 ? '-' : '+'}${String(Math.abs(exp)).padStart(2, '0')}`;
  }
  const f = n.toFixed(Math.max(0, 16 - exp));
  return f.includes('.') ? f.replace(/0+$/, '').replace(/\.$/, '') : f;
}
