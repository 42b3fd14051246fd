//! Element text as nft writes it (`192.0.2.1 . tcp . 80`): the form the
//! `nft -f` writer sends, the listing reads back, and the script keys its
//! elements by.

use std::cell::RefCell;
use std::net::Ipv4Addr;
use std::sync::Arc;

/// An element's key or value text. Shared, not copied: a batch keeps each
/// element it touches under its key, before and after the batch.
pub(crate) type Text = Arc<str>;

/// The parts of a concatenation's text (joined by ` . `; a part holds no
/// space).
pub(crate) fn parts(text: &str) -> impl Iterator<Item = &str> {
    text.split(' ').filter(|p| *p != ".")
}

/// One part of an element's text.
pub(super) enum Part<'a> {
    V4(Ipv4Addr),
    Port(u16),
    Word(&'a str),
}

/// The text of a concatenation (`192.0.2.1 . tcp . 80`), as nft writes it.
/// Written by hand: a batch of a thousand changes writes a few thousand
/// of these, and `format!` was a tenth of the backend's time.
pub(super) fn concat(parts: &[Part<'_>]) -> Text {
    fn num(out: &mut String, mut n: u16) {
        let mut digits = [0u8; 5];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        out.extend(digits[at..].iter().map(|&d| char::from(d)));
    }
    thread_local! {
        static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
    }
    SCRATCH.with_borrow_mut(|out| {
        out.clear();
        write_parts(out, parts, num);
        Text::from(out.as_str())
    })
}

fn write_parts(out: &mut String, parts: &[Part<'_>], num: fn(&mut String, u16)) {
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push_str(" . ");
        }
        match part {
            Part::V4(a) => {
                for (j, octet) in a.octets().into_iter().enumerate() {
                    if j > 0 {
                        out.push('.');
                    }
                    num(out, u16::from(octet));
                }
            }
            Part::Port(p) => num(out, *p),
            Part::Word(w) => out.push_str(w),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_what_format_writes() {
        for (a, p) in [
            (Ipv4Addr::new(0, 0, 0, 0), 0u16),
            (Ipv4Addr::new(192, 0, 2, 9), 10),
            (Ipv4Addr::new(10, 99, 100, 255), 65535),
            (Ipv4Addr::new(255, 255, 255, 255), 1024),
        ] {
            let text = concat(&[Part::V4(a), Part::Word("tcp"), Part::Port(p)]);
            assert_eq!(*text, format!("{a} . tcp . {p}"));
            assert_eq!(parts(&text).count(), 3);
        }
        assert_eq!(*concat(&[Part::Port(7)]), *"7");
    }
}
