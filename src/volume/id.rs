//! Storage-server serials and 8-character volume IDs.
//!
//! A volume ID is three hex digits — `(lss - 0x10) * 0x100 + number` —
//! followed by the server's 5-character serial: LSS 0x11 volume 8 on server
//! `FCA31` is `108FCA31`. The ID is also the volume's NBD export name.

use std::fmt;
use std::str::FromStr;

/// First and last valid logical subsystem numbers.
pub const LSS_MIN: u8 = 0x10;
/// Last valid logical subsystem number.
pub const LSS_MAX: u8 = 0x1F;

/// A storage server's 5-character serial (`[0-9A-Z]{5}`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(String);

/// A malformed serial or volume ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The serial is not five characters from `0-9A-Z`.
    #[error("serial {0:?} must be exactly 5 characters from 0-9 and A-Z")]
    BadSerial(String),
    /// The LSS is outside 0x10..=0x1F.
    #[error("LSS 0x{0:02X} is outside 0x10..0x1F")]
    BadLss(u32),
    /// The text is not a hex LSS number.
    #[error("{0:?} is not an LSS such as 0x10")]
    BadLssText(String),
    /// The volume ID is not 3 hex digits followed by a serial.
    #[error(
        "volume ID {0:?} must be 3 hex digits followed by a 5-character serial, e.g. 108FCA31"
    )]
    BadVolumeId(String),
}

/// Parses an LSS written as hex, with or without `0x` (`0x10`, `10`).
pub fn parse_lss(text: &str) -> Result<u8, IdError> {
    let digits = text.trim_start_matches("0x").trim_start_matches("0X");
    let value =
        u32::from_str_radix(digits, 16).map_err(|_| IdError::BadLssText(text.to_string()))?;
    u8::try_from(value)
        .ok()
        .filter(|l| (LSS_MIN..=LSS_MAX).contains(l))
        .ok_or(IdError::BadLss(value))
}

impl Serial {
    /// Validates and wraps a serial.
    pub fn new(serial: &str) -> Result<Self, IdError> {
        if serial.len() == 5
            && serial
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
        {
            Ok(Serial(serial.to_string()))
        } else {
            Err(IdError::BadSerial(serial.to_string()))
        }
    }

    /// The serial as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identity of one volume: server serial, LSS and number within the LSS.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId {
    /// Logical subsystem, 0x10..=0x1F.
    pub lss: u8,
    /// Number within the LSS, 0..=255.
    pub number: u8,
    /// Serial of the storage server that owns the volume.
    pub serial: Serial,
}

impl VolumeId {
    /// Builds an ID, checking the LSS range.
    pub fn new(lss: u8, number: u8, serial: Serial) -> Result<Self, IdError> {
        if !(LSS_MIN..=LSS_MAX).contains(&lss) {
            return Err(IdError::BadLss(lss.into()));
        }
        Ok(VolumeId {
            lss,
            number,
            serial,
        })
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let index = u32::from(self.lss - LSS_MIN) * 0x100 + u32::from(self.number);
        write!(f, "{index:03X}{}", self.serial)
    }
}

impl FromStr for VolumeId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IdError::BadVolumeId(s.to_string());
        if s.len() != 8 || !s.is_ascii() {
            return Err(bad());
        }
        let index = u32::from_str_radix(&s[..3], 16).map_err(|_| bad())?;
        let serial = Serial::new(&s[3..]).map_err(|_| bad())?;
        let lss = u8::try_from(index / 0x100 + u32::from(LSS_MIN)).map_err(|_| bad())?;
        if lss > LSS_MAX {
            return Err(bad());
        }
        Ok(VolumeId {
            lss,
            number: (index % 0x100) as u8,
            serial,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_the_array() {
        let serial = Serial::new("FCA31").unwrap();
        let id = VolumeId::new(0x11, 8, serial.clone()).unwrap();
        assert_eq!(id.to_string(), "108FCA31");
        assert_eq!(
            VolumeId::new(0x10, 0, serial.clone()).unwrap().to_string(),
            "000FCA31"
        );
        assert_eq!(
            VolumeId::new(0x1F, 255, serial).unwrap().to_string(),
            "FFFFCA31"
        );
    }

    #[test]
    fn parses_and_rejects() {
        let id: VolumeId = "108FCA31".parse().unwrap();
        assert_eq!((id.lss, id.number, id.serial.as_str()), (0x11, 8, "FCA31"));
        assert!("108fca31".parse::<VolumeId>().is_err());
        assert!("G08FCA31".parse::<VolumeId>().is_err());
        assert!("108FCA3".parse::<VolumeId>().is_err());
        assert!(Serial::new("fca31").is_err());
        assert!(VolumeId::new(0x20, 0, Serial::new("FCA31").unwrap()).is_err());
        assert_eq!(parse_lss("0x11"), Ok(0x11));
        assert_eq!(parse_lss("1f"), Ok(0x1F));
        assert_eq!(parse_lss("0x20"), Err(IdError::BadLss(0x20)));
        assert_eq!(parse_lss("ten"), Err(IdError::BadLssText("ten".into())));
    }
}
