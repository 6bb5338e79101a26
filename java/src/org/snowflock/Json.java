package org.snowflock;

import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * The JSON of sfld's messages (sflib/guest/layout.py), both ways: objects as ordered maps,
 * arrays as lists, strings, {@link Num} (the number's text, as it came), booleans, and
 * null. Written the way Python's json.dumps writes (", " and ": "), as libsnowflock does.
 */
final class Json {
    private Json() {}

    /** A number as its text: sfld's IDs and statuses are integers, identities may hold more. */
    record Num(String text) {
        /** Its value if it is an integer in [min, max], else null. */
        Long asLong(long min, long max) {
            try {
                long v = Long.parseLong(text);
                return v >= min && v <= max ? v : null;
            } catch (NumberFormatException e) {
                return null;
            }
        }
    }

    /** Thrown for text that is not JSON. */
    static final class Malformed extends Exception {
        private static final long serialVersionUID = 1L;

        Malformed(String why, int at) {
            super(why + " at offset " + at);
        }
    }

    static Object parse(String text) throws Malformed {
        Json.Parser p = new Json.Parser(text);
        p.space();
        Object v = p.value();
        p.space();
        if (p.at < text.length()) {
            throw new Malformed("trailing characters", p.at);
        }
        return v;
    }

    static String write(Object v) {
        StringBuilder out = new StringBuilder();
        write(out, v);
        return out.toString();
    }

    static void write(StringBuilder out, Object v) {
        if (v == null || v instanceof Boolean) {
            out.append(v);
        } else if (v instanceof Num n) {
            out.append(n.text());
        } else if (v instanceof Number n) {
            out.append(n);
        } else if (v instanceof String s) {
            quote(out, s);
        } else if (v instanceof Map<?, ?> m) {
            out.append('{');
            String sep = "";
            for (Map.Entry<?, ?> e : m.entrySet()) {
                out.append(sep);
                quote(out, String.valueOf(e.getKey()));
                out.append(": ");
                write(out, e.getValue());
                sep = ", ";
            }
            out.append('}');
        } else if (v instanceof List<?> l) {
            out.append('[');
            String sep = "";
            for (Object item : l) {
                out.append(sep);
                write(out, item);
                sep = ", ";
            }
            out.append(']');
        } else {
            throw new IllegalArgumentException("no JSON for " + v.getClass());
        }
    }

    /** As json.dumps with ensure_ascii: non-ASCII as \\u escapes. */
    static void quote(StringBuilder out, String s) {
        out.append('"');
        for (int k = 0; k < s.length(); k++) {
            char c = s.charAt(k);
            switch (c) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                case '\n' -> out.append("\\n");
                case '\r' -> out.append("\\r");
                case '\t' -> out.append("\\t");
                case '\b' -> out.append("\\b");
                case '\f' -> out.append("\\f");
                default -> {
                    if (c < 0x20 || c > 0x7e) {
                        out.append(String.format("\\u%04x", (int) c));
                    } else {
                        out.append(c);
                    }
                }
            }
        }
        out.append('"');
    }

    private static final class Parser {
        private final String s;
        private int at;
        private int depth;

        Parser(String s) {
            this.s = s;
        }

        void space() {
            while (at < s.length() && " \t\r\n".indexOf(s.charAt(at)) >= 0) {
                at++;
            }
        }

        private char peek() throws Malformed {
            if (at >= s.length()) {
                throw new Malformed("unexpected end", at);
            }
            return s.charAt(at);
        }

        private void expect(char c) throws Malformed {
            if (peek() != c) {
                throw new Malformed("expected '" + c + "'", at);
            }
            at++;
        }

        Object value() throws Malformed {
            char c = peek();
            if (c == '{' || c == '[') {
                if (++depth > 64) {
                    throw new Malformed("nested too deep", at);
                }
                Object v = c == '{' ? object() : array();
                depth--;
                return v;
            }
            if (c == '"') {
                return string();
            }
            if (c == '-' || (c >= '0' && c <= '9')) {
                return number();
            }
            for (String word : new String[] {"true", "false", "null"}) {
                if (s.startsWith(word, at)) {
                    at += word.length();
                    return word.equals("null") ? null : Boolean.valueOf(word);
                }
            }
            throw new Malformed("unexpected character", at);
        }

        private Map<String, Object> object() throws Malformed {
            Map<String, Object> m = new LinkedHashMap<>();
            expect('{');
            space();
            if (peek() == '}') {
                at++;
                return m;
            }
            while (true) {
                space();
                String key = string();
                space();
                expect(':');
                space();
                m.put(key, value());
                space();
                if (peek() == '}') {
                    at++;
                    return m;
                }
                expect(',');
            }
        }

        private List<Object> array() throws Malformed {
            List<Object> l = new ArrayList<>();
            expect('[');
            space();
            if (peek() == ']') {
                at++;
                return l;
            }
            while (true) {
                space();
                l.add(value());
                space();
                if (peek() == ']') {
                    at++;
                    return l;
                }
                expect(',');
            }
        }

        private Num number() throws Malformed {
            int start = at;
            while (at < s.length() && "+-0123456789.eE".indexOf(s.charAt(at)) >= 0) {
                at++;
            }
            String text = s.substring(start, at);
            try {
                Double.parseDouble(text);
            } catch (NumberFormatException e) {
                throw new Malformed("bad number", start);
            }
            return new Num(text);
        }

        private String string() throws Malformed {
            expect('"');
            StringBuilder out = new StringBuilder();
            while (true) {
                char c = peek();
                at++;
                if (c == '"') {
                    return out.toString();
                }
                if (c < 0x20) {
                    throw new Malformed("control character in a string", at - 1);
                }
                if (c != '\\') {
                    out.append(c);
                    continue;
                }
                char e = peek();
                at++;
                switch (e) {
                    case '"', '\\', '/' -> out.append(e);
                    case 'n' -> out.append('\n');
                    case 'r' -> out.append('\r');
                    case 't' -> out.append('\t');
                    case 'b' -> out.append('\b');
                    case 'f' -> out.append('\f');
                    case 'u' -> out.append(hex4());
                    default -> throw new Malformed("bad escape", at - 1);
                }
            }
        }

        private char hex4() throws Malformed {
            if (at + 4 > s.length()) {
                throw new Malformed("short \\u escape", at);
            }
            int c = 0;
            for (int k = 0; k < 4; k++) {
                int d = Character.digit(s.charAt(at + k), 16);
                if (d < 0) {
                    throw new Malformed("bad \\u escape", at);
                }
                c = c << 4 | d;
            }
            at += 4;
            return (char) c;
        }
    }
}
