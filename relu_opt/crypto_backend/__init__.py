"""Encrypted inference under CrypTen: conversion, party launch, measurement and the cost model."""
