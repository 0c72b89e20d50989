//! A client's session settings (its startup parameters, then what SET and
//! RESET changed): a handful of short name/value pairs that every client
//! keeps for its whole life, so they live in one small allocation.

use std::fmt;

/// Name/value pairs sorted by name, stored as `name\0value\0...`. Names and
/// values come from C strings of the protocol, so they hold no NUL.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Settings {
    buf: Box<str>,
}

impl Settings {
    pub fn new() -> Self {
        Self::default()
    }

    /// The pairs, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut parts = self.buf.split('\0');
        std::iter::from_fn(move || {
            let k = parts.next()?;
            let v = parts.next()?;
            Some((k, v))
        })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Sets `name` to `value`; a NUL in either is cut off there.
    pub fn insert(&mut self, name: &str, value: &str) {
        let (name, value) = (until_nul(name), until_nul(value));
        if name.is_empty() || self.get(name) == Some(value) {
            return;
        }
        let mut pairs: Vec<(&str, &str)> = self.iter().filter(|(k, _)| *k != name).collect();
        let at = pairs.partition_point(|(k, _)| *k < name);
        pairs.insert(at, (name, value));
        self.buf = join(&pairs);
    }

    pub fn remove(&mut self, name: &str) {
        if self.contains_key(name) {
            let pairs: Vec<(&str, &str)> = self.iter().filter(|(k, _)| *k != name).collect();
            self.buf = join(&pairs);
        }
    }
}

fn until_nul(s: &str) -> &str {
    s.split('\0').next().unwrap_or_default()
}

fn join(pairs: &[(&str, &str)]) -> Box<str> {
    let mut out = String::with_capacity(pairs.iter().map(|(k, v)| k.len() + v.len() + 2).sum());
    for (k, v) in pairs {
        out.push_str(k);
        out.push('\0');
        out.push_str(v);
        out.push('\0');
    }
    out.into_boxed_str()
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Settings {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut s = Settings::new();
        for (k, v) in iter {
            s.insert(k.as_ref(), v.as_ref());
        }
        s
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_sorted_map() {
        let mut s = Settings::new();
        assert!(s.is_empty());
        assert_eq!(s.get("a"), None);
        s.insert("user", "postgres");
        s.insert("application_name", "");
        s.insert("DateStyle", "ISO, MDY");
        assert_eq!(s.len(), 3);
        assert_eq!(s.get("application_name"), Some(""));
        assert_eq!(s.get("user"), Some("postgres"));
        assert!(!s.contains_key("use"));
        s.insert("user", "other");
        assert_eq!(s.get("user"), Some("other"));
        assert_eq!(s.len(), 3);
        let names: Vec<&str> = s.iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["DateStyle", "application_name", "user"]);
        s.remove("application_name");
        s.remove("missing");
        assert_eq!(s.len(), 2);
        assert_eq!(s.get("application_name"), None);
        s.remove("DateStyle");
        s.remove("user");
        assert!(s.is_empty());
        assert_eq!(s.iter().count(), 0);
    }

    #[test]
    fn nul_cuts_and_empty_names_are_ignored() {
        let mut s = Settings::new();
        s.insert("a\0b", "x\0y");
        s.insert("", "v");
        assert_eq!(s.len(), 1);
        assert_eq!(s.get("a"), Some("x"));
        let t: Settings = [("b", "1"), ("a", "x")].into_iter().collect();
        assert_eq!(t.iter().collect::<Vec<_>>(), [("a", "x"), ("b", "1")]);
    }
}
